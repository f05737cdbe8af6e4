#!/usr/bin/env bash
# Install what the tests need and run the whole suite: ruff, mypy, then pytest twice: on pure
# Python, and on the build whose request path mypyc compiles (setup.py, GTS_SIDECAR_COMPILE),
# made in a copy of this tree so no C extension ever lands in the working tree.
# Extra arguments go to pytest (e.g. scripts/test.sh -k outbound -x).
# BUILDS=pure or BUILDS=compiled runs one of the two only.
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
BUILDS=${BUILDS:-pure compiled}
if [[ " $BUILDS " == *" pure "* ]]; then
  echo "== pytest (pure Python)"
  # tests/build checks that this is the build loaded
  GTS_SIDECAR_BUILD=pure .venv/bin/python -m pytest "$@"
fi
if [[ " $BUILDS " == *" compiled "* ]]; then
  echo "== pytest (compiled by mypyc)"
  repo=$PWD
  copy=$(mktemp -d "${TMPDIR:-/tmp}/gts-compiled.XXXXXX")
  trap 'rm -rf "$copy"' EXIT
  # the working tree as it is (tracked files and new ones not ignored), built in place there;
  # the venv and the real clients' node_modules are shared, not copied
  git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -c 2>/dev/null | tar -x -C "$copy"
  ln -s "$repo/.venv" "$copy/.venv"
  [ -d tests/realclients/node/node_modules ] &&
    ln -s "$repo/tests/realclients/node/node_modules" "$copy/tests/realclients/node/node_modules"
  (cd "$copy" && GTS_SIDECAR_COMPILE=1 .venv/bin/python setup.py -q build_ext --inplace \
    >"$copy/build.log" 2>&1) || { tail -40 "$copy/build.log"; exit 1; }
  # PYTHONPATH: processes the tests start import the compiled copy too, ahead of the venv's
  # editable install of the working tree (tests/build fails if they do not)
  (cd "$copy" && GTS_SIDECAR_BUILD=compiled PYTHONPATH="$copy" .venv/bin/python -m pytest "$@")
fi
