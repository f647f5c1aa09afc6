#!/usr/bin/env bash
# Create .venv (if missing) and install attnrw with its test extras into it.
# torch is installed first and pinned: a loose requirement would pull a multi-GB CUDA build,
# where torch==2.13.0 resolves to the CPU wheel this machine keeps on disk.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.attnrw-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing torch==2.13.0, then attnrw[test] (editable)"
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$want" > "$stamp"
fi
