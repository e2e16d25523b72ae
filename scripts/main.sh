#!/usr/bin/env bash
# Runs the main job: the end-to-end LoRA fine-tune on scikit-learn's digits, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh examples
exec .venv/bin/python examples/digits.py "$@"
