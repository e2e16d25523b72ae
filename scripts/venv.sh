# Sourced by the set-up commands: creates or reuses .venv and installs jlora with the given extras.
# Reinstalls only when pyproject.toml or the extras change.
set -euo pipefail
extras="$1"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.jlora-installed-$extras"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  echo "$want" > "$stamp"
fi
