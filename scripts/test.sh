#!/usr/bin/env bash
# Install what the tests need and run the whole suite: ruff, mypy, pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k outbound -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
scripts/system-deps.sh

echo "== ruff"
.venv/bin/ruff check sidecar tests bench
.venv/bin/ruff format --check sidecar tests bench
echo "== import-linter (dependency direction)"
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest "$@"
