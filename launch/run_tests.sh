#!/usr/bin/env bash
# Runs the whole test suite with the project's virtualenv. pytest exits 5 when no test ran: that
# fails here like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
