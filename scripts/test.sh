#!/usr/bin/env bash
# Runs the test suite (the fast default set; pass -m slow for the rest) in a local .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh test
exec .venv/bin/python -m pytest "$@"
