#!/usr/bin/env bash
# Runs the test suite (the fast default set; pass -m slow for the rest) in a local .venv, on
# JLORA_TEST_WORKERS pytest-xdist workers (2 by default, the cores of the project's machines;
# -n 0 runs in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh test
exec .venv/bin/python -m pytest -n "${JLORA_TEST_WORKERS:-2}" "$@"
