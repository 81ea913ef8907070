#!/usr/bin/env bash
# The project's test command: the unit suite, then the end-to-end suite, as two pytest processes.
# They cannot share one: the engine's generated protobuf module and the durabletask SDK's define the
# same top-level message names (the proto has no package), and protobuf refuses both in one process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-.venv/bin/python}"
"$python" -m pytest -q tests/unit "$@"
"$python" -m pytest -q tests/e2e "$@"
