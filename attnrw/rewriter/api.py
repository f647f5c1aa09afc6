"""inspect() and rewrite(): the offline entry points (torch.export programs)."""
from __future__ import annotations

from typing import Any

import torch

from attnrw.config import Dense, PolicySpec
from attnrw.rewriter.report import Report


def inspect(model: Any, args: tuple, kwargs: dict | None = None) -> Report:
    raise NotImplementedError("being written")


def rewrite(model: Any, args: tuple, kwargs: dict | None = None, policy: PolicySpec = Dense(), dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    raise NotImplementedError("being written")
