"""``Merge``: token merging before attention (ToMe / MaMe-MaRe / SAT)."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

import torch

from attnrw.errors import ConfigError
from attnrw.kernels.merge.plan import exact_count, merge_count
from attnrw.policies.base import (
    IMPLS,
    Keep,
    Lowering,
    Policy,
    check_choice,
    check_int,
    check_positions,
    check_ratio,
    register_policy,
)

if TYPE_CHECKING:
    from attnrw.patterns.site import AttentionSite

Schedule = Union[float, int, tuple, Mapping]


@register_policy
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
    """Fraction of a site's tokens merged away, in [0, 1) (or a per-site list / glob dict)."""
    r: Schedule | None = None
    """Number of tokens merged away per site (or a per-site list / glob dict); instead of ratio."""
    mode: str = "kv"
    """kv (keys/values merged), qkv (merge, attend, restore) or tokens (carry the merged tokens on)."""
    protect: tuple[int, ...] = (0,)
    """Token positions that never merge (e.g. 0 for [CLS])."""
    metric: str = "keys"
    """Similarity the merge pairs tokens by: keys."""
    impl: str = "auto"
    """Kernel: auto, torch or triton."""

    name: ClassVar[str] = "merge"

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.r is None):
            raise ConfigError("Merge needs exactly one of ratio= or r=")
        if self.ratio is not None:
            object.__setattr__(self, "ratio", _schedule("Merge", "ratio", self.ratio, check_ratio))
        else:
            object.__setattr__(
                self, "r", _schedule("Merge", "r", self.r, lambda o, n, v: check_int(o, n, v, 0))
            )
        check_choice("Merge", "mode", self.mode, ("kv", "qkv", "tokens"))
        object.__setattr__(self, "protect", check_positions("Merge", "protect", self.protect))
        check_choice("Merge", "metric", self.metric, ("keys",))
        check_choice("Merge", "impl", self.impl, IMPLS)

    def amount(self, site: AttentionSite) -> tuple[float, int]:
        """``(ratio, r)`` of one site as the op takes them (``r == -1``: use the ratio)."""
        if self.ratio is not None:
            return float(_schedule_value(self.ratio, "ratio", site)), -1
        return 0.0, int(_schedule_value(self.r, "r", site))

    def lower(self, site: AttentionSite) -> Lowering | Keep:
        if site.causal:
            return Keep("merge not applicable (causal: merging keys would mix past and future); kept dense")
        mode, note = self.mode, ""
        if mode != "kv" and not site.self_attention:
            mode, note = "kv", f"{mode} mode needs one aligned sequence; merged keys/values only (kv)"
        if mode == "tokens":
            # Runs as "qkv" at the site; the tokens pass (attnrw.rewriter.tokens) then carries
            # the merged tokens on where it can prove the layers after the site token-wise.
            mode = "qkv"
        ratio, r = self.amount(site)
        kwargs = dict(ratio=ratio, r=r, mode=mode, protect=list(self.protect), impl=self.impl, is_causal=False)
        return Lowering(torch.ops.attnrw.merged_attention.default, kwargs, note)

    def cost(self, site: AttentionSite) -> float:
        """Attention FLOPs on the merged tokens over dense; in ``tokens`` mode on the tokens the site receives.

        ``kv`` shrinks the keys, ``qkv`` and ``tokens`` also the queries. In
        ``tokens`` mode the earlier sites (graph order) have merged and carried
        their tokens, so this site starts from fewer than ``kv_len``: with a
        number or a per-site list the count is followed site by site (with a
        dict of globs the earlier sites' paths are not known here, so only this
        site's merge is counted). It assumes every earlier site is a carried
        ``tokens`` site of this policy; where the tokens pass fell back, the
        report says so and the site costs more than this.
        """
        if site.causal or site.kv_len <= 0:
            return 1.0
        if self.mode == "kv" or not site.self_attention:
            return self._kept(site, site.kv_len) / site.kv_len
        if self.mode == "qkv":
            return (self._kept(site, site.kv_len) / site.kv_len) ** 2
        n = site.kv_len
        if not isinstance(self.ratio if self.ratio is not None else self.r, dict):
            for j in range(site.index):
                n = self._kept(dataclasses.replace(site, index=j), n)
        return (self._kept(site, n) / site.kv_len) ** 2

    def _kept(self, site: AttentionSite, tokens: int) -> int:
        """Tokens left after this policy merges at ``site`` from ``tokens`` (the count tokens mode uses)."""
        ratio, r = self.amount(site)
        if self.mode == "tokens":
            return tokens - exact_count(tokens, ratio, r, len(self.protect))
        return tokens - merge_count(tokens, ratio, r)


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


def _schedule_value(value: Any, name: str, site: AttentionSite) -> Any:
    """One site's value of a schedule (a number, a per-site list, or a dict of globs)."""
    if isinstance(value, tuple):
        if site.index >= len(value):
            raise ConfigError(
                f"Merge.{name} lists {len(value)} values but the graph has a site number {site.index + 1}; "
                "give one value per site in graph order"
            )
        return value[site.index]
    if isinstance(value, dict):
        for pattern, v in value.items():
            if fnmatch.fnmatchcase(site.module_path, pattern):
                return v
        return 0
    return value
