#!/usr/bin/env bash
# Fail when the committed generated code in protos/ differs from a fresh generation.
# Generated files must never be edited by hand: change the .proto and run scripts/gen_protos.sh.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp_dir="$(mktemp -d)"
trap 'rm -rf "$tmp_dir"' EXIT

bash "$repo_root/scripts/gen_protos.sh" "$tmp_dir"

status=0
for name in orchestrator_service_pb2.py orchestrator_service_pb2.pyi orchestrator_service_pb2_grpc.py; do
  if ! diff -u "$repo_root/protos/$name" "$tmp_dir/protos/$name"; then
    status=1
  fi
done

if [ "$status" -ne 0 ]; then
  echo "protos/ generated code is stale or hand-edited; run: bash scripts/gen_protos.sh" >&2
  exit 1
fi
echo "protos/ generated code is up to date."
