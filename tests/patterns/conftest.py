"""Each test compiles from a clean dynamo cache: models share code objects
(transformers' wrappers), and recompiles across tests would hit dynamo's
recompile limit and silently fall back to eager."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
