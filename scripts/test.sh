#!/usr/bin/env bash
# Set up .venv if needed and run the tests. Extra arguments go to pytest,
# e.g. bash scripts/test.sh tests/test_cli.py -m "not slow"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@"
