#!/usr/bin/env bash
# Regenerate the Python protobuf/gRPC modules in protos/ from protos/orchestrator_service.proto.
# Usage: bash scripts/gen_protos.sh [OUT_DIR]   (OUT_DIR defaults to the repo root)
# The interpreter can be overridden with PYTHON=/path/to/python.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${1:-.}"
cd "$repo_root"

"${PYTHON:-python}" -m grpc_tools.protoc \
  -I. \
  --python_out="$out_dir" \
  --pyi_out="$out_dir" \
  --grpc_python_out="$out_dir" \
  protos/orchestrator_service.proto
