#!/usr/bin/env bash
# Regenerate embedding_pb2.py, embedding_pb2_grpc.py and embedding_pb2.pyi from embedding.proto.
# Run from anywhere; uses the project's venv. The generated files are committed (never edit
# them by hand); tests/test_embedding_table.py fails when they are stale.
# The folder installs as persia_inc.embedding_server, so the proto is compiled from a scratch
# tree laid out as the import root; the generated imports then name persia_inc.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
out="${1:-$root}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/src/persia_inc/embedding_server/protos" "$scratch/gen" "$out/embedding_server/protos"
cp "$root/embedding_server/protos/embedding.proto" "$scratch/src/persia_inc/embedding_server/protos/"
cd "$scratch/src"
"$python" -m grpc_tools.protoc -I . --python_out="$scratch/gen" --pyi_out="$scratch/gen" \
    --grpc_python_out="$scratch/gen" persia_inc/embedding_server/protos/embedding.proto
cp "$scratch/gen/persia_inc/embedding_server/protos/"embedding_pb2* "$out/embedding_server/protos/"
