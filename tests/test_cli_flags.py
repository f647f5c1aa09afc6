"""Tests of the policy flags generated from the registry (:mod:`attnrw.cli_flags`).

The parser is exercised directly (fast); the few runs through
:func:`attnrw.cli.main` stop at the flags, before any model is loaded.
"""

from __future__ import annotations

import argparse
import os.path
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

import pytest

from attnrw import cli, cli_flags
from attnrw.errors import ConfigError
from attnrw.policies import Auto, Condense, FieldInfo, Merge, Policy, base, policy_fields, register_policy, registry
from tests.test_cli import assert_usage_error, run_cli


@dataclass(frozen=True)
class Tilt(Policy):
    """A policy defined outside attnrw: an int, a bool and a tuple field."""

    strength: int
    """How far to tilt the scores."""
    both_ways: bool = False
    """Tilt towards earlier and later keys."""
    rows: tuple[int, ...] = ()
    """Query rows to tilt."""

    name: ClassVar[str] = "tilt"


@dataclass(frozen=True)
class Lean(Policy):
    """A second outside policy whose ``strength`` is a float (Tilt's is an int): one flag, two parsers."""

    strength: float = 0.5
    """How far to lean."""

    name: ClassVar[str] = "lean"


@pytest.fixture
def outside_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register Tilt and Lean in a copy of the registry that is put back after the test."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    register_policy(Tilt)
    register_policy(Lean)


def parse(*flags: str, command: str = "rewrite") -> argparse.Namespace:
    output = ["-o", "x.pt2"] if command != "bench" else []
    return cli.build_parser().parse_args([command, "m.pt2", *output, *flags])


def policy(*flags: str) -> Policy:
    return cli.policy_from_args(parse(*flags))


def all_fields() -> list[tuple[str, FieldInfo]]:
    return [(name, info) for name, cls in registry().items() for info in policy_fields(cls)]


# --- every field of every registered policy has a flag ------------------------------------


def test_rewrite_help_lists_every_field_of_every_policy(
    capsys: pytest.CaptureFixture[str], outside_policies: None
) -> None:
    code, out, _ = run_cli(capsys, "rewrite", "--help")
    assert code == 0
    assert {"tilt", "lean"} <= set(registry())
    for name, info in all_fields():
        flag = cli_flags.flag_name(info.name)
        assert f"{flag} " in out, f"{name}.{info.name} has no {flag} in rewrite --help"
        if info.doc:
            assert info.doc.split()[0] in out
    assert "--size-bias" in out and "--pooling" in out and "--r " in out and "--protect" in out
    assert ", ".join(registry()) in out, "--policy's help lists the registered names"


def test_every_default_round_trips_through_its_flag(outside_policies: None) -> None:
    """Each field's default, written as on the command line, parses back into the field's type."""
    checked = 0
    for name, info in all_fields():
        if info.required or info.default is None:
            continue
        flag = cli_flags.flag_name(info.name)
        value = cli_flags.parse_field(flag, info, cli_flags.format_value(info.default))
        assert value == info.default and type(value) is type(info.default), (name, info.name, value)
        checked += 1
    assert checked >= 15


def test_flags_parse_into_field_types() -> None:
    got = policy("--policy", "condense", "--recent", "8", "--group", "4", "--pooling", "query", "--size-bias", "true")
    assert got == Condense(recent=8, group=4, pooling="query", size_bias=True)
    assert policy("--policy", "merge", "--r", "4", "--protect", "0,1") == Merge(r=4, protect=(0, 1))
    assert policy("--policy", "merge", "--r", "4,2", "--protect", "") == Merge(r=(4, 2), protect=())
    assert policy("--policy", "merge", "--ratio", "0.25", "--mode", "qkv") == Merge(ratio=0.25, mode="qkv")
    glob = policy("--policy", "merge", "--ratio", '{"encoder.layer.1.*": 0.5}')
    assert glob == Merge(ratio={"encoder.layer.1.*": 0.5})
    assert policy("--policy", "merge", "--ratio", "[0.5, 0.25]") == Merge(ratio=(0.5, 0.25))
    for text, expected in [("yes", True), ("0", False), ("FALSE", False), ("1", True)]:
        got = policy("--policy", "condense", "--recent", "8", "--group", "4", "--size-bias", text)
        assert isinstance(got, Condense) and got.size_bias is expected


def test_auto_candidates_take_json() -> None:
    got = policy("--policy", "auto", "--budget", "0.1", "--calib", "2",
                 "--candidates", '[{"policy": "sparse", "window": 8, "sinks": 0}, {"policy": "dense"}]')
    assert isinstance(got, Auto) and got.calib == 2 and got.budget == 0.1
    assert [c.to_dict() for c in got.candidates] == [
        {"policy": "sparse", "window": 8, "sinks": 0, "topk": 0, "block_size": 64, "impl": "auto"},
        {"policy": "dense", "impl": "auto"},
    ]


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, flag, expects",
    [
        (["--policy", "condense", "--recent", "8", "--group", "4", "--size-bias", "maybe"], "--size-bias", "true"),
        (["--policy", "merge", "--r", "2", "--protect", "a,b"], "--protect", "ints"),
        (["--policy", "sparse", "--window", "x"], "--window", "an int"),
        (["--policy", "auto", "--budget", "1e-2", "--candidates", "[{"], "--candidates", "JSON"),
        (["--policy", "merge", "--ratio", "half"], "--ratio", "a number"),
    ],
)
def test_bad_value_is_one_line_naming_the_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], flag: str, expects: str
) -> None:
    # The flags are checked before the model is loaded: the model need not exist.
    code, _, err = run_cli(capsys, "rewrite", "no_such_pkg_attnrw:fn", "-o", str(tmp_path / "o.pt2"), *flags)
    assert_usage_error(code, err, flag, expects)
    with pytest.raises(ConfigError, match=f"^{flag}: expected"):
        cli.policy_from_args(parse(*flags))


def test_flag_of_another_policy_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "rewrite", "no_such_pkg_attnrw:fn", "-o", str(tmp_path / "o.pt2"),
                           "--policy", "sparse", "--window", "8", "--pooling", "mean")
    assert_usage_error(code, err, "--pooling", "sparse", "--window")
    with pytest.raises(ConfigError, match=r"--r, --protect are not flags of --policy condense "
                                          r"\(--r and --protect go with --policy merge; --policy condense takes"):
        policy("--policy", "condense", "--recent", "8", "--group", "4", "--r", "2", "--protect", "1")


def test_missing_required_flag_is_named() -> None:
    with pytest.raises(ConfigError, match="--policy condense needs --recent and --group"):
        policy("--policy", "condense")


# --- policies registered outside attnrw ------------------------------------------------------


def test_registered_policy_gets_flags(outside_policies: None) -> None:
    got = policy("--policy", "tilt", "--strength", "3", "--both-ways", "yes", "--rows", "1,2")
    assert got == Tilt(strength=3, both_ways=True, rows=(1, 2))
    assert policy("--policy", "tilt", "--strength", "1") == Tilt(strength=1)
    with pytest.raises(ConfigError, match="--both-ways: expected true or false"):
        policy("--policy", "tilt", "--strength", "1", "--both-ways", "maybe")
    with pytest.raises(ConfigError, match="--rows is not a flag of --policy sparse \\(--rows goes with --policy tilt;"):
        policy("--policy", "sparse", "--window", "4", "--rows", "1")


def test_shared_flag_parses_as_the_chosen_policy_needs(outside_policies: None) -> None:
    assert policy("--policy", "lean", "--strength", "0.25") == Lean(strength=0.25)
    with pytest.raises(ConfigError, match="--strength: expected an int, got '0.25'"):
        policy("--policy", "tilt", "--strength", "0.25")


def test_registry_is_read_when_the_parser_is_built(capsys: pytest.CaptureFixture[str]) -> None:
    """Without the fixture Tilt is not registered, so its flags are not there (nothing is cached)."""
    code, out, _ = run_cli(capsys, "rewrite", "--help")
    assert code == 0 and "--both-ways" not in out and "tilt" not in out


def test_field_named_like_a_command_option_gets_a_qualified_flag() -> None:
    """``bench`` has its own ``--calib`` (calibration batches); Auto's ``calib`` field is ``--auto-calib`` there."""
    assert cli_flags.flag_table(["--calib"])["auto"]["calib"] == "--auto-calib"
    ns = parse("--policy", "auto", "--budget", "0.1", "--auto-calib", "2", "--calib", "3", command="bench")
    assert ns.calib == 3
    got = cli.policy_from_args(ns)
    assert isinstance(got, Auto) and got.calib == 2
    ns = parse("--policy", "auto", "--budget", "0.1", "--calib", "2")
    got = cli.policy_from_args(ns)
    assert isinstance(got, Auto) and got.calib == 2


# --- the syntax of each kind of type ----------------------------------------------------------


def _parse(tp: object, text: str) -> object:
    return cli_flags.parse_field("--f", FieldInfo("f", tp, None, False, ""), text)


@pytest.mark.parametrize(
    "tp, text, expected",
    [
        (Optional[int], "7", 7),
        (float, "1e-3", 1e-3),
        (Literal["a", "b"], "b", "b"),
        (list[float], "0.5, 2", [0.5, 2.0]),
        (tuple[int, str], "3,x", (3, "x")),
        (dict, '{"a": [1, 2]}', {"a": [1, 2]}),
        (Callable[[int], int] | None, "os.path:join", os.path.join),
    ],
)
def test_type_syntax(tp: object, text: str, expected: object) -> None:
    assert _parse(tp, text) == expected


@pytest.mark.parametrize(
    "tp, text, needle",
    [
        (Literal["a", "b"], "c", "expected one of a, b"),
        (tuple[int, str], "3", "expected 2 comma-separated values"),
        (dict, "{", "not JSON"),
        (Callable, "not a spec", "expected an importable pkg.module:function"),
        (Callable, "no_such_mod_attnrw:fn", "cannot import 'no_such_mod_attnrw'"),
        (Callable, "os.path:no_such_fn", "has no callable 'no_such_fn'"),
    ],
)
def test_type_syntax_errors(tp: object, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="^--f: ") as info:
        _parse(tp, text)
    assert needle in str(info.value) and "\n" not in str(info.value)
