#!/usr/bin/env bash
# Runs the fast suite on one dependency stack, in its own venv:
#   oldest: Python 3.11 with every dependency at its declared floor (constraints/oldest.txt),
#   newest: the newest Python >= 3.12 on the machine with the newest releases of everything.
# Usage: bash scripts/test-stack.sh oldest|newest [pytest args...]
# The venv (.venv-oldest, .venv-newest) is reused and rebuilt from scratch only when
# pyproject.toml, the constraints or the interpreter change; `rm -rf .venv-newest` re-resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
leg="${1:-}"
[ "$leg" = oldest ] || [ "$leg" = newest ] || {
  echo "usage: bash scripts/test-stack.sh oldest|newest [pytest args...]" >&2
  exit 2
}
shift

# Candidate interpreters, best first per leg; the first that runs, has the right version and can
# make a venv (Debian's python3.X without python3.X-venv cannot) wins.
pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
candidates() {
  local v
  if [ "$1" = oldest ]; then
    command -v python3.11 python3 2>/dev/null || true
    ls -d "$pyenv_root"/versions/3.11*/bin/python3 2>/dev/null | sort -rV || true
  else
    for v in 3.15 3.14 3.13 3.12; do
      command -v "python$v" 2>/dev/null || true
      ls -d "$pyenv_root/versions/$v"*/bin/python3 /usr/bin/python"$v" /usr/local/bin/python"$v" \
        2>/dev/null | sort -rV || true
    done
  fi
}
if [ "$leg" = oldest ]; then
  want='sys.version_info[:2] == (3, 11)'
else
  want='sys.version_info >= (3, 12)'
fi
python="${JLORA_STACK_PYTHON:-}"
if [ -z "$python" ]; then
  while read -r p; do
    if [ -n "$p" ] && "$p" -c "import sys, venv, ensurepip; sys.exit(not ($want))" 2>/dev/null; then
      python="$p"
      break
    fi
  done < <(candidates "$leg")
fi
if [ -z "$python" ]; then
  if [ "$leg" = newest ]; then
    echo "[newest] skipped: no Python >= 3.12 on this machine"
    exit 0
  fi
  echo "[oldest] no Python 3.11 found (set JLORA_STACK_PYTHON)" >&2
  exit 1
fi

venv=".venv-$leg"
pyver="$("$python" -c 'import sys; print(sys.version.split()[0])')"
if [ "$leg" = oldest ]; then
  install=(-c constraints/oldest.txt -e '.[test]')
  inputs="$(cat pyproject.toml constraints/oldest.txt)"
else
  install=(--upgrade --upgrade-strategy eager -e '.[test]')
  inputs="$(cat pyproject.toml)"
fi
want_stamp="$(printf '%s\n%s\n%s\n' "$python" "$pyver" "$inputs" | sha256sum | cut -c1-16)"
stamp="$venv/.jlora-stack"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
  echo "[$leg] building $venv with Python $pyver ($python)"
  start=$SECONDS
  rm -rf "$venv"
  "$python" -m venv "$venv"
  log="$venv/install.log"
  if ! { "$venv/bin/python" -m pip install --upgrade pip &&
    "$venv/bin/python" -m pip install "${install[@]}"; } > "$log" 2>&1; then
    tail -n 40 "$log"
    echo "[$leg] install failed; full log in $log" >&2
    exit 1
  fi
  echo "$want_stamp" > "$stamp"
  echo "[$leg] installed in $((SECONDS - start)) s"
fi
"$venv/bin/python" -m pip list --format=freeze 2>/dev/null |
  grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|numpy|safetensors|tqdm|pytest|pytest-xdist|hypothesis|scikit-learn|matplotlib)==' |
  paste -sd' ' | sed "s/^/[$leg] Python $pyver: /"
start=$SECONDS
status=0
"$venv/bin/python" -m pytest -n "${JLORA_TEST_WORKERS:-2}" "$@" || status=$?
echo "[$leg] tests took $((SECONDS - start)) s"
exit "$status"
