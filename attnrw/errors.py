"""Typed errors a user can cause. Each message says what to do about it.

The classes are defined in :mod:`attnrw_cli.errors` (torch-free, so that the
``attnrw`` launcher raises the same ones) and are the same objects here.
"""

from __future__ import annotations

from attnrw_cli.errors import *  # noqa: F403  (the list is attnrw_cli.errors.__all__)
from attnrw_cli.errors import __all__  # noqa: F401
