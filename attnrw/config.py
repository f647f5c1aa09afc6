"""Policies: what each attention site is rewritten into.

A policy is a frozen dataclass validated at construction; a bad field raises
:class:`~attnrw.errors.ConfigError` (a ``ValueError``) naming the field and
the allowed range. Every policy round-trips through a plain dict
(``policy.to_dict()`` / :func:`policy_from_dict`); the ``options={...}`` of
``torch.compile`` and the CLI flags both parse into one with
:func:`parse_options`.

Where a function takes a policy it also takes a *policy spec*:

* a policy, applied to every site;
* a dict ``{glob over module path: policy or None}``; the first glob that
  matches a site's ``module_path`` (``fnmatch`` rules, in dict order) wins, and
  a site that no glob matches, or whose glob maps to ``None``, is left as the
  model wrote it;
* a callable ``site -> policy | None``, with ``None`` meaning "leave as is".
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

from attnrw.errors import ConfigError

if TYPE_CHECKING:
    from attnrw.patterns.site import AttentionSite

IMPLS = ("auto", "torch", "triton")

#: Default block size of the chunked PyTorch paths. Measured on the 2-core CPU
#: (benchmarks/bench_sparse_kernel.py, S=2048..16384, W=256; benchmarks/RESULTS.md):
#: 32 was 2-7% ahead of 64 (within noise), 128 was 15-20% slower (more wasted keys at
#: the band edges). 64 keeps top-k blocks coarse enough to be worth choosing.
DEFAULT_BLOCK_SIZE = 64


def _check_int(owner: str, name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{owner}.{name} must be {rng}, got {value}")


def _check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_ratio(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0):
        raise ConfigError(f"{owner}.{name} must be a number in [0, 1), got {value!r}")


class Policy:
    """Base class of the policies. Subclasses are frozen dataclasses."""

    name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """A plain dict with a ``"policy"`` key, accepted by :func:`policy_from_dict`."""
        out: dict[str, Any] = {"policy": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [v.to_dict() if isinstance(v, Policy) else v for v in value]
            out[f.name] = value
        return out

    @property
    def exact(self) -> bool:
        """Whether the rewrite gives the original outputs (to rounding)."""
        return False


@dataclass(frozen=True)
class Dense(Policy):
    """Exact rewrite: the site becomes one fused attention call (SDPA).

    ``impl``: ``"auto"`` or ``"torch"`` run PyTorch's SDPA (FlashAttention or
    cuDNN on a GPU where PyTorch has them).
    """

    impl: str = "auto"
    name: ClassVar[str] = "dense"

    def __post_init__(self) -> None:
        _check_choice("Dense", "impl", self.impl, ("auto", "torch"))

    @property
    def exact(self) -> bool:
        return True


@dataclass(frozen=True)
class Sparse(Policy):
    """Sinks + sliding window (+ block top-k) attention.

    On a causal site a query at ``i`` sees keys ``j`` with
    ``i - window < j <= i`` (the query itself counts); on a bidirectional site
    it sees ``|i - j| <= window // 2``. In both it also sees the first
    ``sinks`` keys, and with ``topk = k`` the ``k`` key blocks (of
    ``block_size`` keys) whose block-pooled ``Q·Kᵀ`` score is highest for its
    query block, chosen among blocks not already visible. The site's own masks
    still apply on top. Sites whose queries and keys are not one aligned
    sequence stay dense and are reported.
    """

    window: int
    sinks: int = 0
    topk: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    impl: str = "auto"
    name: ClassVar[str] = "sparse"

    def __post_init__(self) -> None:
        _check_int("Sparse", "window", self.window, 1)
        _check_int("Sparse", "sinks", self.sinks, 0)
        _check_int("Sparse", "topk", self.topk, 0)
        _check_int("Sparse", "block_size", self.block_size, 1)
        _check_choice("Sparse", "impl", self.impl, IMPLS)


@dataclass(frozen=True)
class Condense(Policy):
    """Recent tokens exact, older tokens condensed in groups of ``group``.

    Keys after the ``sinks`` are cut into groups of ``group`` starting at
    position ``sinks``. A query sees the sinks, every key of the groups its
    recent window touches, and one summary key/value for each other group it
    may see. ``pooling="mean"`` averages keys and values; ``"query"`` weights
    them by their softmax score against a probe query (the mean query of the
    query's block). With ``size_bias`` a summary carries ``log(size)``.
    """

    recent: int
    group: int
    sinks: int = 0
    pooling: str = "mean"
    size_bias: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE
    impl: str = "auto"
    name: ClassVar[str] = "condense"

    def __post_init__(self) -> None:
        _check_int("Condense", "recent", self.recent, 1)
        _check_int("Condense", "group", self.group, 1)
        _check_int("Condense", "sinks", self.sinks, 0)
        _check_choice("Condense", "pooling", self.pooling, ("mean", "query"))
        if not isinstance(self.size_bias, bool):
            raise ConfigError(f"Condense.size_bias must be a bool, got {self.size_bias!r}")
        _check_int("Condense", "block_size", self.block_size, 1)
        _check_choice("Condense", "impl", self.impl, IMPLS)


Schedule = Union[float, int, tuple, Mapping]


@dataclass(frozen=True)
class Merge(Policy):
    """Token merging before attention (ToMe / MaMe-MaRe / SAT).

    Give exactly one of ``ratio`` (fraction of a site's tokens merged away,
    in [0, 1)) or ``r`` (a count). Either may be a schedule: a list with one
    value per site in graph order, or a dict of module-path globs.
    ``mode`` is ``"kv"`` (keys/values merged, queries full), ``"qkv"``
    (merge, attend, restore) or ``"tokens"`` (the reduced tokens are carried
    through the token-wise region that follows, :mod:`attnrw.rewriter.tokens`;
    ratios then apply to the tokens a site receives, so they compound, and a
    site merges at most ``N - |protect| - 2`` tokens so the count is exact;
    a site whose region cannot be proven token-wise stays ``"qkv"`` and the
    report says why; inference only). ``protect`` lists positions that
    never merge.
    """

    ratio: Schedule | None = None
    r: Schedule | None = None
    mode: str = "kv"
    protect: tuple[int, ...] = (0,)
    metric: str = "keys"
    impl: str = "auto"
    name: ClassVar[str] = "merge"

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.r is None):
            raise ConfigError("Merge needs exactly one of ratio= or r=")
        if self.ratio is not None:
            object.__setattr__(self, "ratio", _schedule("Merge", "ratio", self.ratio, _check_ratio))
        else:
            object.__setattr__(
                self, "r", _schedule("Merge", "r", self.r, lambda o, n, v: _check_int(o, n, v, 0))
            )
        _check_choice("Merge", "mode", self.mode, ("kv", "qkv", "tokens"))
        protect = tuple(self.protect) if isinstance(self.protect, (list, tuple)) else self.protect
        if not isinstance(protect, tuple):
            raise ConfigError(f"Merge.protect must be a list of token positions, got {self.protect!r}")
        for p in protect:
            _check_int("Merge", "protect[]", p, 0)
        object.__setattr__(self, "protect", protect)
        _check_choice("Merge", "metric", self.metric, ("keys",))
        _check_choice("Merge", "impl", self.impl, IMPLS)


def _schedule(owner: str, name: str, value: Any, check: Callable[[str, str, Any], None]) -> Schedule:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{owner}.{name}: schedule keys must be module-path globs, got {k!r}")
            check(owner, f"{name}[{k!r}]", v)
        return dict(value)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{owner}.{name}: a schedule list must not be empty")
        for i, v in enumerate(value):
            check(owner, f"{name}[{i}]", v)
        return tuple(value)
    check(owner, name, value)
    return value


@dataclass(frozen=True)
class Auto(Policy):
    """Calibrated per-site choice of the cheapest candidate within ``budget``.

    ``budget`` bounds the relative L2 error of the model output against the
    unmodified model. ``candidates`` defaults to a ladder of Sparse, Condense
    and Merge settings from cheap to costly, then Dense.
    """

    budget: float
    candidates: tuple[Policy, ...] | None = None
    metric: str = "rel_l2"
    calib: int | None = None
    name: ClassVar[str] = "auto"

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (b > 0 and math.isfinite(b)):
            raise ConfigError(f"Auto.budget must be a positive number, got {b!r}")
        if self.candidates is not None:
            cands = tuple(
                policy_from_dict(c) if isinstance(c, Mapping) else c for c in self.candidates
            )
            for c in cands:
                if not isinstance(c, Policy) or isinstance(c, Auto):
                    raise ConfigError(f"Auto.candidates must be non-Auto policies, got {c!r}")
            object.__setattr__(self, "candidates", cands)
        _check_choice("Auto", "metric", self.metric, ("rel_l2",))
        if self.calib is not None:
            _check_int("Auto", "calib", self.calib, 1)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Dense, Sparse, Condense, Merge, Auto)}

PolicySpec = Union[Policy, Mapping[str, Union[Policy, None]], Callable[["AttentionSite"], Union[Policy, None]]]


def policy_from_dict(d: Mapping[str, Any]) -> Policy:
    """Build a policy from ``{"policy": name, **fields}``; unknown keys are an error."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a policy dict must be a mapping, got {type(d).__name__}")
    d = dict(d)
    name = d.pop("policy", "dense")
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    allowed = {f.name for f in dataclasses.fields(cls)}
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


@dataclass(frozen=True)
class BackendSettings:
    """Settings of the ``torch.compile`` backend that are not part of the policy.

    ``inner``: what compiles the rewritten graph, ``"inductor"`` (default) or
    ``"eager"`` (runs it as is; for debugging and fast tests).
    ``plan``: path of a saved Auto plan to apply instead of calibrating.
    """

    inner: str = "inductor"
    plan: str | None = None

    def __post_init__(self) -> None:
        _check_choice("options", "inner", self.inner, ("inductor", "eager"))


_BACKEND_KEYS = {f.name for f in dataclasses.fields(BackendSettings)}


def parse_options(options: Mapping[str, Any] | None) -> tuple[PolicySpec, BackendSettings]:
    """Parse ``torch.compile(..., options={...})`` into a policy spec and backend settings.

    ``options["policy"]`` is a policy name (its fields are the other keys), a
    policy object, or a dict of globs. Unknown keys raise ``ConfigError``.
    """
    opts = dict(options or {})
    backend_kw = {k: opts.pop(k) for k in list(opts) if k in _BACKEND_KEYS}
    settings = BackendSettings(**backend_kw)
    if settings.plan is not None and opts:
        raise ConfigError(
            f"options {', '.join(map(repr, sorted(opts)))} given beside 'plan'; a saved plan fixes every site's policy"
        )
    policy = opts.pop("policy", None)
    if isinstance(policy, Policy) or (isinstance(policy, Mapping)) or callable(policy):
        if opts:
            raise ConfigError(
                f"option(s) {', '.join(map(repr, sorted(opts)))} given beside a policy object; "
                "put them in the policy instead"
            )
        return policy, settings  # type: ignore[return-value]
    if policy is None and not opts:
        return Dense(), settings
    return policy_from_dict({"policy": policy or "dense", **opts}), settings


def resolve_policy(spec: PolicySpec, site: AttentionSite) -> Policy | None:
    """The policy a spec gives one site, or ``None`` to leave the site as written."""
    if isinstance(spec, Auto):
        raise ConfigError("an Auto policy is calibrated as a whole (attnrw.calibrate), not resolved per site")
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Mapping):
        for pattern, policy in spec.items():
            if fnmatch.fnmatchcase(site.module_path, pattern):
                if policy is not None and not isinstance(policy, Policy):
                    raise ConfigError(f"policy for {pattern!r} must be a policy or None, got {policy!r}")
                return policy
        return None
    if callable(spec):
        policy = spec(site)
        if policy is not None and not isinstance(policy, Policy):
            raise ConfigError(f"policy callable returned {policy!r} for {site.module_path!r}; expected a policy or None")
        return policy
    raise ConfigError(f"a policy must be a Policy, a dict of globs or a callable, got {type(spec).__name__}")


def check_policy_spec(spec: Any) -> None:
    """Raise ``ConfigError`` early for a spec that is none of the accepted kinds."""
    from attnrw.rewriter.plan import Plan

    if isinstance(spec, (Policy, Plan)) or callable(spec):
        return
    if isinstance(spec, Mapping):
        for k, v in spec.items():
            if not isinstance(k, str) or not (v is None or isinstance(v, Policy)):
                raise ConfigError(f"policy dict entries must map a glob to a policy or None, got {k!r}: {v!r}")
        return
    raise ConfigError(f"a policy must be a Policy, a dict of globs or a callable, got {type(spec).__name__}")


__all__ = [
    "Auto",
    "BackendSettings",
    "Condense",
    "Dense",
    "Merge",
    "Policy",
    "PolicySpec",
    "Sparse",
    "check_policy_spec",
    "parse_options",
    "policy_from_dict",
    "resolve_policy",
]
