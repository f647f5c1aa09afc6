"""The torch.compile backend."""
from __future__ import annotations

from typing import Any, Callable

from attnrw.config import PolicySpec


def backend(policy: PolicySpec, on_report: Callable | None = None) -> Callable:
    raise NotImplementedError("being written")


def entry_point_backend(gm: Any, example_inputs: Any, options: dict | None = None) -> Callable:
    raise NotImplementedError("being written")
