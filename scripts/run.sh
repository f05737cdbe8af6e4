#!/usr/bin/env bash
# Install (first time) and run the sidecar with the example config.
# Any arguments replace the default `run --config config/sidecar.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ $# -eq 0 ]; then
  set -- run --config config/sidecar.yaml
fi
exec .venv/bin/gts-sidecar "$@"
