#!/usr/bin/env bash
# Set up .venv if needed and run the demo on the pretrained all-MiniLM-L6-v2 (no download).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 exec .venv/bin/python examples/demo.py
