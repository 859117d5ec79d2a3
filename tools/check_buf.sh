#!/usr/bin/env bash
# The proto as a contract: buf lint, and buf breaking against the committed
# previous version (tools/buf/baseline/claypot.proto). Fails on a lint error or
# on any change that would break an existing client (FILE rules).
#
# buf comes from the npm registry: npm ci --prefix tools/buf
#
# When a release deliberately makes additive changes, they pass as they are;
# the baseline moves forward only when a release is cut:
#   cp proto/claypot.proto tools/buf/baseline/claypot.proto
set -euo pipefail
cd "$(dirname "$0")/.."
BUF="${BUF:-tools/buf/node_modules/.bin/buf}"
AGAINST="${1:-tools/buf/baseline}"
PROTO_DIR="${PROTO_DIR:-proto}"   # the proto under test (a scratch copy in the tests)

if [ ! -x "$BUF" ]; then
    echo "check_buf: $BUF is missing (npm ci --prefix tools/buf)" >&2
    exit 2
fi

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/current" "$SCRATCH/baseline"
cp "$PROTO_DIR"/*.proto tools/buf/buf.yaml "$SCRATCH/current/"
cp "$AGAINST"/*.proto tools/buf/buf.yaml "$SCRATCH/baseline/"

BUF="$(cd "$(dirname "$BUF")" && pwd)/$(basename "$BUF")"
(cd "$SCRATCH/current" && "$BUF" lint)
(cd "$SCRATCH/current" && "$BUF" breaking --against "$SCRATCH/baseline")
echo "check_buf: proto/ passes buf lint and has no breaking change against $AGAINST"
