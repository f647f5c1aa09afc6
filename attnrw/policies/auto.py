"""``Auto``: a calibrated per-site choice among candidate policies (:mod:`attnrw.rewriter.calibrate`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from attnrw.errors import ConfigError
from attnrw.policies.base import Keep, Policy, check_choice, check_int, policy_from_dict, register_policy, registry

if TYPE_CHECKING:
    from attnrw.patterns.site import AttentionSite


@register_policy
@dataclass(frozen=True)
class Auto(Policy):
    """Calibrated per-site choice of the cheapest candidate within ``budget``.

    ``budget`` bounds the relative L2 error of the model output against the
    unmodified model. ``candidates`` defaults to every registered policy's
    :meth:`~attnrw.Policy.auto_candidates` (cheap to costly), then Dense.
    """

    budget: float
    """Largest relative L2 error of the model output allowed against the unmodified model."""
    candidates: tuple[Policy, ...] | None = None
    """Policies to choose among (default: each registered policy's own settings, then dense)."""
    metric: str = "rel_l2"
    """Error measure of the budget: rel_l2."""
    calib: int | None = None
    """Calibration samples to use (default: all given)."""

    name: ClassVar[str] = "auto"
    per_site: ClassVar[bool] = False

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (b > 0 and math.isfinite(b)):
            raise ConfigError(f"Auto.budget must be a positive number, got {b!r}")
        if self.candidates is not None:
            cands = tuple(policy_from_dict(c) if isinstance(c, Mapping) else c for c in self.candidates)
            for c in cands:
                if not isinstance(c, Policy) or not c.per_site:
                    raise ConfigError(f"Auto.candidates must be per-site policies (not Auto), got {c!r}")
            object.__setattr__(self, "candidates", cands)
        check_choice("Auto", "metric", self.metric, ("rel_l2",))
        if self.calib is not None:
            check_int("Auto", "calib", self.calib, 1)

    def lower(self, site: AttentionSite) -> Keep:
        raise ConfigError("an Auto policy is calibrated into a Plan (attnrw.calibrate) before it is applied")

    def ladder(self) -> tuple[Policy, ...]:
        """The candidates calibration tries: ``candidates`` or the default ladder."""
        return self.candidates if self.candidates is not None else default_candidates()


def default_candidates() -> tuple[Policy, ...]:
    """Every registered policy's :meth:`~attnrw.Policy.auto_candidates`, in registration order."""
    out: list[Policy] = []
    for cls in registry().values():
        out.extend(cls.auto_candidates())
    return tuple(out)
