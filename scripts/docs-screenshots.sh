#!/usr/bin/env bash
# Renders pages of the built documentation site to PNG with headless Chromium, to look at them as
# a reader would (figures present, code visible, no raw markup): the index, a tutorial with
# figures and an API page. Build the site first (bash scripts/docs.sh).
# Usage: bash scripts/docs-screenshots.sh [HTML_DIR] [OUT_DIR]
#   (defaults: docs/_build/html and docs/_build/screenshots)
# Uses Debian's chromium; as root on a Debian-like machine without it, installs it with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
html="$(cd "${1:-docs/_build/html}" && pwd)"
out="${2:-docs/_build/screenshots}"
mkdir -p "$out"
find_browser() { command -v chromium chromium-browser google-chrome 2>/dev/null | head -n 1; }
browser="$(find_browser || true)"
if [ -z "$browser" ] && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
  echo "docs-screenshots: installing Debian's chromium" >&2
  apt-get update -qq > /dev/null && apt-get install -y -qq chromium > /dev/null
  browser="$(find_browser || true)"
fi
if [ -z "$browser" ]; then
  echo "docs-screenshots: no chromium found (apt-get install chromium)" >&2
  exit 3
fi
# page  width,height: tall enough to show what the page is about (a tutorial's first figure)
pages=(
  "index.html 1280,1500"
  "tutorials/diagnostics.html 1280,4600"
  "api/analysis.html 1280,2600"
)
for entry in "${pages[@]}"; do
  read -r page size <<< "$entry"
  png="$out/$(echo "${page%.html}" | tr '/' '_').png"
  # --no-sandbox: Chromium refuses to run as root with its sandbox; the pages are our own files.
  timeout 120 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --disable-dev-shm-usage --no-first-run --window-size="$size" --virtual-time-budget=5000 \
    --screenshot="$png" "file://$html/$page" > /dev/null 2>&1
  [ -s "$png" ] || { echo "docs-screenshots: $page gave no picture" >&2; exit 1; }
  echo "$png"
done
