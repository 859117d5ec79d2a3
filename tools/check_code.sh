#!/usr/bin/env bash
# Static checks CI runs after the tests: lint and format (ruff), the layer contracts
# (import-linter: the client side and the runtime never import the backend), and
# types (mypy; the pure cores listed in pyproject.toml are held to strict rules,
# and everywhere else no new error may appear: tools/mypy-baseline.txt lists the
# known ones, and a fixed one must leave it, so the count only goes down).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
lint-imports
mypy --follow-imports=silent store/backend/_core/lifecycle.py store/errors.py store/config.py \
    runtime/_graph.py runtime/_scheduler.py
# Regenerate the baseline after fixing errors:
#   mypy store runtime | mypy-baseline sync --baseline-path tools/mypy-baseline.txt --sort-baseline \
#       --ignore-categories note annotation-unchecked
report=$(mktemp)
trap 'rm -f "$report"' EXIT
{ mypy store runtime || true; } | mypy-baseline filter --baseline-path tools/mypy-baseline.txt --no-colors \
    --ignore-categories note annotation-unchecked \
    > "$report" || { cat "$report"; exit 1; }
