#!/usr/bin/env bash
# Set up (once) and run the test suite and the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests benchmarks finetune ingest
.venv/bin/python -m pytest "$@"
