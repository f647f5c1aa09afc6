"""Shared test setup: make ``tests.zoo`` importable however pytest is started."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# torch.export writes structured-trace records (empty messages, the data in `extra`) to the
# non-propagating "torch.__trace" logger whenever it has a handler; pytest attaches its capture
# handlers to every non-propagating logger, so each failing test's captured log would show ~150
# blank DEBUG lines. Drop them unless a trace was asked for (TORCH_TRACE attaches its own handler).
if not (os.environ.get("TORCH_TRACE") or os.environ.get("TORCH_DTRACE")):
    logging.getLogger("torch.__trace").addFilter(lambda record: False)
