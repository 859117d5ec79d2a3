#!/usr/bin/env bash
# Static checks CI runs after the tests: lint (ruff), the layer contracts
# (import-linter: the client side and the runtime never import the backend), and
# types (mypy; the pure cores listed in pyproject.toml are held to strict rules).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
lint-imports
mypy --follow-imports=silent store/backend/lifecycle.py store/errors.py store/config.py \
    runtime/graph.py runtime/scheduler.py
