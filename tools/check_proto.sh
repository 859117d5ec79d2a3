#!/usr/bin/env bash
# Fails if the committed store/_wire/generated/ differs from what proto/ generates.
#
# It runs tools/gen_proto.sh itself (so the check and the generator cannot
# drift apart) inside a scratch copy of proto/ and tools/, and never touches
# the working tree or git state. Needs grpcio-tools from the dev extra:
#   pip install -e ".[dev]" && tools/check_proto.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python}"

if ! "$PY" -c "import grpc_tools.protoc" 2>/dev/null; then
    echo "check_proto: grpc_tools is not installed for $PY (pip install -e '.[dev]')" >&2
    exit 2
fi

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/tools" "$SCRATCH/store/_wire/generated"
cp -R proto "$SCRATCH/proto"
cp tools/gen_proto.sh "$SCRATCH/tools/gen_proto.sh"
PYTHON="$PY" bash "$SCRATCH/tools/gen_proto.sh"

status=0
for generated in "$SCRATCH"/store/_wire/generated/*; do
    name="$(basename "$generated")"
    if [ ! -f "store/_wire/generated/$name" ]; then
        echo "check_proto: store/_wire/generated/$name is missing (run tools/gen_proto.sh)" >&2
        status=1
    elif ! diff -u "store/_wire/generated/$name" "$generated" >&2; then
        echo "check_proto: store/_wire/generated/$name is stale (run tools/gen_proto.sh)" >&2
        status=1
    fi
done
for committed in store/_wire/generated/*_pb2*.py store/_wire/generated/*_pb2*.pyi; do
    [ -e "$committed" ] || continue
    if [ ! -f "$SCRATCH/store/_wire/generated/$(basename "$committed")" ]; then
        echo "check_proto: $committed has no .proto source any more" >&2
        status=1
    fi
done
if [ "$status" -ne 0 ]; then
    version="$("$PY" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')"
    echo "check_proto: FAILED (grpcio-tools $version; the dev extra pins the version used)" >&2
    exit 1
fi
echo "check_proto: store/_wire/generated matches proto/ (root $ROOT)"
