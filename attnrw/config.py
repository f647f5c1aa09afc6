"""Policy specs and options: how a user names the policies of a model's sites.

The policies themselves live in :mod:`attnrw.policies` (one module each,
registered by name). A policy is a frozen dataclass validated at
construction; a bad field raises :class:`~attnrw.errors.ConfigError` (a
``ValueError``) naming the field and the allowed range. Every policy
round-trips through a plain dict (``policy.to_dict()`` /
:func:`policy_from_dict`); the ``options={...}`` of ``torch.compile`` and the
CLI flags both parse into one with :func:`parse_options`.

Where a function takes a policy it also takes a *policy spec*:

* a policy, applied to every site;
* a dict ``{glob over module path: policy or None}``; the first glob that
  matches a site's ``module_path`` (``fnmatch`` rules, in dict order) wins, and
  a site that no glob matches, or whose glob maps to ``None``, is left as the
  model wrote it;
* a callable ``site -> policy | None``, with ``None`` meaning "leave as is";
* a :class:`~attnrw.Plan` (anything with ``policies_for(matches)``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from attnrw.errors import ConfigError
from attnrw.policies import Dense, Policy, policy_from_dict
from attnrw.policies.base import check_choice

if TYPE_CHECKING:
    from attnrw.patterns.site import AttentionSite

PolicySpec = Union[Policy, Mapping[str, Union[Policy, None]], Callable[["AttentionSite"], Union[Policy, None]]]


def needs_calibration(spec: Any) -> bool:
    """Whether ``spec`` is a policy calibrated as a whole (Auto) rather than lowered site by site."""
    return isinstance(spec, Policy) and not spec.per_site


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
        check_choice("options", "inner", self.inner, ("inductor", "eager"))


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
    if needs_calibration(spec):
        raise ConfigError(f"a {spec.name} policy is calibrated as a whole (attnrw.calibrate), not resolved per site")
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
    if isinstance(spec, Policy) or callable(getattr(spec, "policies_for", None)) or callable(spec):
        return
    if isinstance(spec, Mapping):
        for k, v in spec.items():
            if not isinstance(k, str) or not (v is None or isinstance(v, Policy)):
                raise ConfigError(f"policy dict entries must map a glob to a policy or None, got {k!r}: {v!r}")
        return
    raise ConfigError(f"a policy must be a Policy, a dict of globs or a callable, got {type(spec).__name__}")


__all__ = [
    "BackendSettings",
    "PolicySpec",
    "check_policy_spec",
    "needs_calibration",
    "parse_options",
    "policy_from_dict",
    "resolve_policy",
]
