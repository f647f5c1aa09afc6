#!/usr/bin/env bash
# The attnrw command on a Python factory: list the attention sites, then rewrite to a .pt2 file.
# Run: bash examples/cli_inspect.sh   (with attnrw installed, e.g. in an activated .venv)
set -euo pipefail
cd "$(dirname "$0")"   # so that the factory module tiny_model.py is importable

attnrw inspect tiny_model:build

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
attnrw rewrite tiny_model:build --policy sparse --window 16 --sinks 4 -o "$out/tiny.attnrw.pt2"
