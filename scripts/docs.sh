#!/usr/bin/env bash
# Builds the documentation site: docs/ -> docs/_build/html (open docs/_build/html/index.html;
# JLORA_DOCS_OUT=DIR builds into DIR instead).
# Sphinx + myst-nb execute every tutorial (docs/tutorials/*.md, MyST markdown notebooks) on the CPU,
# offline, and the build fails on any warning: a broken cross-reference, a docstring that does not
# parse, a cell that raises or runs past its timeout.
# Creates or reuses .venv-docs/ with jlora's `docs` extra (its own venv, so the test venv is left
# alone); reinstalls only when pyproject.toml or this script changes. Extra arguments go to
# sphinx-build (e.g. `-E` to re-read every page). JLORA_DOCS_EXECUTE=off skips executing the
# notebooks (a quick look at the layout; the pages then show no outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
venv=.venv-docs
start=$SECONDS
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.jlora-installed-docs"
want="$(cat pyproject.toml scripts/docs.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log="$venv/install.log"
  if ! { "$venv/bin/python" -m pip install --upgrade pip &&
    "$venv/bin/python" -m pip install -e ".[docs]"; } > "$log" 2>&1; then
    tail -n 40 "$log"
    echo "docs: install failed; full log in $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
  echo "docs: installed $venv in $((SECONDS - start)) s"
fi
# The notebooks' kernels inherit this environment: CPU only, no accelerator probing, no hub.
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3 PYDEVD_DISABLE_FILE_VALIDATION=1
out="${JLORA_DOCS_OUT:-docs/_build/html}"
build_start=$SECONDS
"$venv/bin/python" -m sphinx -W --keep-going -n -b html docs "$out" "$@"
echo "docs: built $out in $((SECONDS - build_start)) s ($((SECONDS - start)) s in all)"
