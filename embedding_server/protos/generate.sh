#!/usr/bin/env bash
# Regenerate embedding_pb2.py, embedding_pb2_grpc.py and embedding_pb2.pyi from embedding.proto.
# Run from anywhere; uses the project's venv. The generated files are committed (never edit
# them by hand); tests/test_embedding_table.py fails when they are stale.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
out="${1:-$root}"
cd "$root"
"$python" -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    embedding_server/protos/embedding.proto
