#!/usr/bin/env bash
# Regenerates store/_wire/generated/ from proto/claypot.proto. The generated grpc
# module imports its messages with an absolute import; rewrite it to a
# relative one so the code lives inside the store package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -m grpc_tools.protoc -I proto --python_out=store/_wire/generated --pyi_out=store/_wire/generated \
    --grpc_python_out=store/_wire/generated proto/claypot.proto
sed -i 's/^import claypot_pb2 as claypot__pb2/from . import claypot_pb2 as claypot__pb2/' \
    store/_wire/generated/claypot_pb2_grpc.py
