"""Import ``fn`` from a ``pkg.module:fn`` spec: how a model factory, a CLI callable flag and a plan name a function."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from attnrw.errors import ConfigError

__all__ = ["CALLABLE_SPEC", "callable_spec", "cwd_on_path", "import_callable"]

CALLABLE_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


@contextlib.contextmanager
def cwd_on_path() -> Iterator[None]:
    """Put the current directory first on ``sys.path`` for an import, as ``python -m`` does."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_callable(spec: str, error: type[Exception] = ConfigError, context: str = "") -> Callable[..., Any]:
    """``fn`` of ``pkg.module:fn``, imported with the current directory first on ``sys.path``.

    A failed import or a missing (or not callable) ``fn`` raises ``error``
    with a message saying which, followed by `` (context)`` when given.
    """
    module_name, fn_name = spec.split(":")
    where = f" ({context})" if context else ""
    with cwd_on_path():
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise error(
                f"cannot import {module_name!r}{where}: {type(e).__name__}: {e} "
                "(run from the folder that holds the package, or install it)"
            ) from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise error(f"module {module_name!r} has no callable {fn_name!r}{where}")
    return fn


def callable_spec(fn: Any) -> str | None:
    """The ``pkg.module:fn`` spec that imports ``fn`` back, or None (a lambda, a local or nested function)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    spec = f"{module}:{qualname}"
    if not module or not CALLABLE_SPEC.match(spec):
        return None
    return spec
