"""The ONNX form of each op, looked up by op: :func:`register_translation` and :func:`translation_table`.

A translation is a traced function of the op's arguments (by name, as in the
op's schema) that builds standard ONNX operators (see :mod:`attnrw.export._graph`);
``torch.onnx.export`` calls it in place of the op. Each built-in translation
registers itself in its own module (:mod:`~attnrw.export.dense`,
:mod:`~attnrw.export.sparse`, :mod:`~attnrw.export.merge`,
:mod:`~attnrw.export.tokens`); a policy with its own op registers its own::

    attnrw.export.register_translation(torch.ops.mylib.my_attention.default, my_attention_onnx)

:func:`check_translatable` runs before the export: an attnrw op (or an op a
policy emitted) with no translation is refused with a
:class:`~attnrw.errors.ConfigError` naming the op and the policy, and each
registered ``check`` sees the node's arguments by name and refuses settings
its translation cannot hold (``Sparse(topk>0)``, merge modes).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch._ops import OpOverload

from attnrw.errors import ConfigError
from attnrw.opargs import bind

__all__ = ["Translation", "check_translatable", "register_translation", "registered_translation", "translation_table"]

logger = logging.getLogger("attnrw.export")

#: ``node.meta`` key under which the rewriter records the policy that emitted a node.
POLICY_META = "attnrw_policy"


@dataclass(frozen=True)
class Translation:
    """The ONNX form of one op: ``fn`` (or, with ``per_opset``, ``fn(opset)`` giving it) and an optional ``check``."""

    op: OpOverload
    fn: Callable[..., Any]
    check: Callable[..., None] | None = None
    per_opset: bool = False

    def for_opset(self, opset: int) -> Callable[..., Any]:
        """The translation function for a target opset."""
        return self.fn(opset) if self.per_opset else self.fn

    def check_node(self, node: torch.fx.Node) -> None:
        """Call ``check`` with the node's arguments bound by name (those it takes, or all with ``**kwargs``)."""
        if self.check is None:
            return
        bound = bind(node)
        params = inspect.signature(self.check).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            names = {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}
            bound = {k: v for k, v in bound.items() if k in names}
        self.check(**bound)


_TRANSLATIONS: dict[OpOverload, Translation] = {}


def op_text(op: OpOverload) -> str:
    """``torch.ops.namespace.name.overload``: how an op is named in messages."""
    return f"torch.ops.{op.namespace}.{op.__name__}"


def op_text_packet(packet: Any) -> str:
    """``torch.ops.namespace.name`` of an op packet."""
    namespace, _, name = packet._qualified_op_name.partition("::")
    return f"torch.ops.{namespace}.{name}"


def register_translation(
    op: OpOverload,
    fn: Callable[..., Any],
    check: Callable[..., None] | None = None,
    *,
    per_opset: bool = False,
) -> Callable[..., Any]:
    """Make ``fn`` the ONNX translation of ``op`` for :func:`attnrw.export.to_onnx`.

    Args:
        op: the op, an ``OpOverload`` such as ``torch.ops.mylib.my_attention.default``.
        fn: a function taking the op's arguments by their schema names and
            returning the ONNX values of its outputs, built with onnxscript
            operators (``from onnxscript import opset18 as op``). With
            ``per_opset=True``, a function of the target opset returning that.
        check: called before the export with the arguments of each call of
            ``op`` bound by name (only the names it declares, unless it takes
            ``**kwargs``; tensors are graph nodes, the rest their values); it
            raises a typed error (:class:`~attnrw.errors.ConfigError`) when
            that call has no ONNX form.
        per_opset: ``fn`` is a factory ``fn(opset) -> translation``.

    A second registration for the same op replaces the first. Returns ``fn``.
    """
    if isinstance(op, torch._ops.OpOverloadPacket):
        raise ConfigError(
            f"register_translation takes one overload of an op: give {op_text_packet(op)}.default, not the packet"
        )
    if not isinstance(op, OpOverload):
        raise ConfigError(
            f"register_translation takes an op overload such as torch.ops.mylib.my_attention.default, got {op!r}"
        )
    if not callable(fn):
        raise ConfigError(f"the translation of {op_text(op)} must be a function, got {type(fn).__name__}")
    if check is not None and not callable(check):
        raise ConfigError(f"the check of {op_text(op)} must be a function, got {type(check).__name__}")
    if op in _TRANSLATIONS:
        logger.debug("replacing the ONNX translation of %s", op_text(op))
    _TRANSLATIONS[op] = Translation(op, fn, check, per_opset)
    return fn


def registered_translation(op: Any) -> Translation | None:
    """What :func:`register_translation` recorded for ``op``, or ``None``."""
    return _TRANSLATIONS.get(op)


def translation_table(opset: int) -> dict[OpOverload, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export``: every registered op's translation at ``opset``."""
    return {op: t.for_opset(opset) for op, t in _TRANSLATIONS.items()}


def _policy_text(policy: Any) -> str:
    return policy if isinstance(policy, str) else repr(policy)


def check_translatable(program: torch.export.ExportedProgram, table: Mapping[Any, Any]) -> None:
    """Fail before exporting, with a ``ConfigError`` that says what to do, on calls ONNX cannot hold.

    A call is refused when its op is an attnrw op, or was emitted by a policy
    (``node.meta["attnrw_policy"]``), and ``table`` has no translation for it;
    or when the check registered with its translation refuses its arguments.
    """
    for node in program.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, OpOverload):
            continue
        policy = node.meta.get(POLICY_META)
        if target not in table:
            if target.namespace == "attnrw" or policy is not None:
                raise ConfigError(_no_translation(target, node.name, policy, table))
            continue
        entry = _TRANSLATIONS.get(target)
        if entry is not None:
            entry.check_node(node)


def _no_translation(op: OpOverload, where: str, policy: Any, table: Mapping[Any, Any]) -> str:
    source = f"emitted for the policy {_policy_text(policy)}" if policy is not None else "in the program"
    known = ", ".join(sorted(op_text(o) for o in table if isinstance(o, OpOverload))) or "none"
    return (
        f"{op_text(op)} (at {where}, {source}) has no ONNX translation. Rewrite with a policy whose op has one "
        f"(the ops with one: {known}), e.g. Dense, Sparse(topk=0) or Merge, or register the op's ONNX form "
        "with attnrw.export.register_translation(op, fn)"
    )
