#!/usr/bin/env bash
# Regenerate grpc_predict_v2_pb2.py and .pyi from grpc_predict_v2.proto (messages only: the
# server and client register the service under its protocol name by hand, see the proto).
# Run from anywhere; uses the project's venv. The generated files are committed (never edit
# them by hand); tests/test_kserve_frontend.py fails when they are stale.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
out="${1:-$root}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/src/persia_inc/inference/oip_protos" "$scratch/gen" "$out/inference/oip_protos"
cp "$root/inference/oip_protos/grpc_predict_v2.proto" "$scratch/src/persia_inc/inference/oip_protos/"
cd "$scratch/src"
"$python" -m grpc_tools.protoc -I . --python_out="$scratch/gen" --pyi_out="$scratch/gen" \
    persia_inc/inference/oip_protos/grpc_predict_v2.proto
cp "$scratch/gen/persia_inc/inference/oip_protos/"grpc_predict_v2_pb2* "$out/inference/oip_protos/"
