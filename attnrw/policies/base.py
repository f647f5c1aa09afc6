"""The policy contract: what a policy is, what it lowers a site to, and the registry.

A policy is a frozen dataclass subclass of :class:`Policy`, registered with
:func:`register_policy`. Registration is all it takes to be usable
everywhere: ``torch.compile(options={"policy": name, ...})``,
:func:`attnrw.rewrite`, plan files, the CLI (one flag per field, generated
from the dataclass) and Auto's candidates. The rewriter asks a policy two
things about each site:

* :meth:`Policy.lower` -- a :class:`Lowering` (the op to emit and its
  arguments after ``(q, k, v, attn_mask, is_causal, scale)``, bound by name)
  or a :class:`Keep` (leave the site exact, with the reason for the report);
* :meth:`Policy.cost` -- the FLOPs of the site under the policy as a
  fraction of dense attention (Auto ranks candidates by it).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from attnrw.errors import ConfigError
from attnrw.kernels.dispatch import IMPLS

if TYPE_CHECKING:
    from attnrw.patterns.site import AttentionSite

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "IMPLS",
    "FieldInfo",
    "Keep",
    "Lowering",
    "Policy",
    "dense_flops",
    "get_policy",
    "policy_fields",
    "policy_from_dict",
    "register_policy",
    "registry",
]

#: Default block size of the chunked PyTorch paths. Measured on the 2-core CPU
#: (benchmarks/bench_sparse_kernel.py, S=2048..16384, W=256; benchmarks/RESULTS.md):
#: 32 was 2-7% ahead of 64 (within noise), 128 was 15-20% slower (more wasted keys at
#: the band edges). 64 keeps top-k blocks coarse enough to be worth choosing.
DEFAULT_BLOCK_SIZE = 64

#: The leading arguments every lowered op takes, in this order; the pass fills them.
SITE_ARGS = ("q", "k", "v", "attn_mask", "is_causal", "scale")

ScoreBias = Callable[[Any, Any, Any, Any], Any]


@dataclass(frozen=True)
class Lowering:
    """Emit ``op(q, k, v, attn_mask, is_causal, scale, **kwargs)`` for a site.

    ``op`` is an ``OpOverload`` whose schema starts with the six arguments of
    ``SITE_ARGS``; ``kwargs`` binds the rest by name (missing ones take the
    schema's defaults). ``kwargs`` may also hold ``is_causal`` to override
    what the pass passes (the site's own flag: True where its causal mask was
    folded away). ``note`` goes into the report. ``score_bias``, when given,
    is ``fn(b, h, q_idx, kv_idx) -> Tensor`` over broadcasting index tensors;
    the pass traces it into the graph and adds it to the site's mask (an
    additive float mask of the query's dtype), so it applies before softmax.
    """

    op: Any
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
    score_bias: ScoreBias | None = None

    @property
    def op_name(self) -> str:
        return str(self.op.name()).split("::")[-1].split(".")[0]


@dataclass(frozen=True)
class Keep:
    """Keep a site exact (dense attention) instead of applying the policy; ``reason`` goes into the report."""

    reason: str


class Policy:
    """Base class of the policies. Subclasses are frozen dataclasses, registered with :func:`register_policy`.

    ``name`` is what ``options={"policy": name}``, the CLI ``--policy`` and
    plan files call the policy. ``per_site`` is False for a policy that is
    calibrated as a whole into a :class:`~attnrw.Plan` (Auto) rather than
    lowered site by site.
    """

    name: ClassVar[str] = ""
    per_site: ClassVar[bool] = True

    def lower(self, site: AttentionSite) -> Lowering | Keep:
        """The op this policy turns ``site`` into, or :class:`Keep` with the reason it does not apply."""
        raise NotImplementedError(f"{type(self).__name__} does not define lower()")

    def cost(self, site: AttentionSite) -> float:
        """FLOPs of ``site`` under this policy, as a fraction of dense attention (1.0 when nothing is saved)."""
        return 1.0

    @property
    def exact(self) -> bool:
        """Whether the rewrite gives the original outputs (to rounding)."""
        return False

    @classmethod
    def auto_candidates(cls) -> tuple[Policy, ...]:
        """Settings of this policy that :class:`~attnrw.Auto` tries by default (none unless overridden)."""
        return ()

    def to_dict(self) -> dict[str, Any]:
        """A plain dict with a ``"policy"`` key, accepted by :func:`attnrw.policy_from_dict`."""
        out: dict[str, Any] = {"policy": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [v.to_dict() if isinstance(v, Policy) else v for v in value]
            out[f.name] = value
        return out


_REGISTRY: dict[str, type[Policy]] = {}

P = TypeVar("P", bound=type[Policy])


def register_policy(cls: P) -> P:
    """Class decorator: make a :class:`Policy` subclass usable by name everywhere.

    The class must be a frozen dataclass with a non-empty ``name`` that no
    other registered policy has (re-registering the same class is a no-op,
    so a module may be reloaded).
    """
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise TypeError(f"register_policy takes a subclass of attnrw.Policy, got {cls!r}")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass (@dataclass(frozen=True))")
    name = cls.name
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__name__}.name must be an identifier-like string, got {name!r}")
    known = _REGISTRY.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"a policy named {name!r} is already registered ({known.__module__}.{known.__qualname__})")
    _REGISTRY[name] = cls
    return cls


def registry() -> dict[str, type[Policy]]:
    """The registered policies by name, in registration order."""
    return dict(_REGISTRY)


def get_policy(name: Any) -> type[Policy]:
    """The registered policy class called ``name``; ``ConfigError`` listing the known names otherwise."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(_REGISTRY)}")
    return cls


def policy_from_dict(d: Mapping[str, Any]) -> Policy:
    """Build a policy from ``{"policy": name, **fields}``; unknown keys are an error."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a policy dict must be a mapping, got {type(d).__name__}")
    d = dict(d)
    name = d.pop("policy", "dense")
    cls = get_policy(name)
    allowed = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for policy {name!r}; "
            f"allowed: {', '.join(sorted(allowed)) or '(none)'}"
        )
    try:
        return cls(**d)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"policy {name!r}: {e}") from None


# -- fields -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldInfo:
    """One dataclass field of a policy: its name, type, default and the first line of its docstring."""

    name: str
    type: Any
    default: Any
    required: bool
    doc: str


def policy_fields(cls: type[Policy]) -> list[FieldInfo]:
    """The fields of a policy class (what its CLI flags and dict keys are), in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        out.append(FieldInfo(f.name, hints.get(f.name, Any), default, required, docs.get(f.name, "")))
    return out


def _field_docs(cls: type) -> dict[str, str]:
    """``{field: first docstring line}`` from the string literals that follow each annotated field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value).splitlines()[0]
    return docs


# -- field checks (ConfigError naming the field) ------------------------------------------


def check_int(owner: str, name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{owner}.{name} must be {rng}, got {value}")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_ratio(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0):
        raise ConfigError(f"{owner}.{name} must be a number in [0, 1), got {value!r}")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}.{name} must be a bool, got {value!r}")


def check_positions(owner: str, name: str, value: Any) -> tuple[int, ...]:
    """A list of non-negative ints as a tuple."""
    items = tuple(value) if isinstance(value, (list, tuple)) else value
    if not isinstance(items, tuple):
        raise ConfigError(f"{owner}.{name} must be a list of non-negative ints, got {value!r}")
    for p in items:
        check_int(owner, f"{name}[]", p, 0)
    return items


# -- cost ---------------------------------------------------------------------------------


def dense_flops(site: AttentionSite) -> float:
    """Multiply-add FLOPs of the two attention products of one site, dense (per call)."""
    per_key = 2 * (site.head_dim + site.v_head_dim)
    return float(site.batch * site.num_heads * site.q_len * dense_keys(site) * per_key)


def dense_keys(site: AttentionSite) -> float:
    """Keys a query sees on average in dense attention (half the keys, plus one, when causal)."""
    return (site.kv_len + 1) / 2 if site.causal else float(site.kv_len)


def key_fraction(site: AttentionSite, keys: float) -> float:
    """The cost of seeing ``keys`` keys per query, as a fraction of dense (never above 1)."""
    full = dense_keys(site)
    return min(1.0, keys / full) if full > 0 else 1.0

