"""Policies: validation naming the field, round-trip through dicts, per-site resolution."""

from __future__ import annotations

import pytest

import attnrw
from attnrw.config import resolve_policy
from attnrw.policies import Auto, Condense, Dense, Merge, Sparse, policy_from_dict
from attnrw.patterns.site import AttentionSite


def _site(path: str) -> AttentionSite:
    return AttentionSite(path, "eager", 2, 2, 8, 8, 4, 4, 0.5, False, "none", 0.0, "float32", 1, True, "n")


@pytest.mark.parametrize(
    "policy",
    [
        Dense(),
        Sparse(window=256, sinks=4, topk=2, block_size=32, impl="torch"),
        Condense(recent=64, group=16, sinks=1, pooling="query"),
        Merge(ratio=0.5, mode="tokens", protect=(0, 1)),
        Merge(r=[4, 8], mode="qkv"),
        Merge(ratio={"encoder.*": 0.25}),
        Auto(budget=0.01, candidates=(Sparse(window=64), Dense())),
    ],
)
def test_round_trip_through_dict(policy: attnrw.Policy) -> None:
    assert policy_from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: Sparse(window=0), "Sparse.window"),
        (lambda: Sparse(window=8, sinks=-1), "Sparse.sinks"),
        (lambda: Sparse(window=8, impl="cuda"), "Sparse.impl"),
        (lambda: Sparse(window=8.5), "Sparse.window"),
        (lambda: Condense(recent=8, group=0), "Condense.group"),
        (lambda: Condense(recent=8, group=4, pooling="max"), "Condense.pooling"),
        (lambda: Merge(ratio=1.0), "Merge.ratio"),
        (lambda: Merge(), "exactly one of ratio"),
        (lambda: Merge(ratio=0.5, r=3), "exactly one of ratio"),
        (lambda: Merge(ratio=0.5, mode="all"), "Merge.mode"),
        (lambda: Auto(budget=0), "Auto.budget"),
        (lambda: Dense(impl="triton"), "Dense.impl"),
    ],
)
def test_validation_names_the_field(make, field: str) -> None:
    with pytest.raises(attnrw.ConfigError, match=field.replace(".", r"\.")):
        make()


def test_policy_dict_first_glob_wins_and_none_leaves_site() -> None:
    spec = {"encoder.layer.0.*": None, "encoder.*": Sparse(window=4)}
    assert resolve_policy(spec, _site("encoder.layer.0.attention")) is None
    assert resolve_policy(spec, _site("encoder.layer.1.attention")) == Sparse(window=4)
    assert resolve_policy(spec, _site("decoder.layer.0")) is None


def test_policy_callable() -> None:
    spec = lambda site: Dense() if site.module_path.endswith("1") else None  # noqa: E731
    assert resolve_policy(spec, _site("a.1")) == Dense()
    assert resolve_policy(spec, _site("a.0")) is None
    with pytest.raises(attnrw.ConfigError, match="expected a policy"):
        resolve_policy(lambda s: "dense", _site("a"))
