"""Saving and loading plans: the typed error of every malformed file and of an output path that cannot be written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnrw.errors import OutputExistsError, OutputFolderError, PlanError
from attnrw.files import CLI_HINT
from attnrw.policies import Dense, Sparse
from attnrw.rewriter.plan import Plan, PlanEntry


def _plan() -> Plan:
    return Plan(
        entries=[
            PlanEntry("encoder.layer.0.attention.self#0", Sparse(window=8), 1e-3, 0.5, "ok"),
            PlanEntry("encoder.layer.1.attention.self#0", Dense(), 0.0, 0.0),
        ],
        budget=0.05,
        model_error=2e-3,
        notes=["a note"],
    )


def test_round_trip(tmp_path: Path) -> None:
    plan = _plan()
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path).to_dict() == plan.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_save_raises_typed_errors(tmp_path: Path) -> None:
    plan = _plan()
    path = plan.save(tmp_path / "plan.json")
    before = path.read_text()
    with pytest.raises(OutputExistsError, match="pass force=True"):
        Plan(entries=[], budget=1.0).save(path)
    with pytest.raises(OutputExistsError, match="pass --force"):
        Plan(entries=[], budget=1.0).save(path, hint=CLI_HINT)
    assert path.read_text() == before
    Plan(entries=[], budget=1.0).save(path, force=True)
    assert Plan.load(path).entries == []
    with pytest.raises(OutputFolderError, match="does not exist"):
        plan.save(tmp_path / "missing" / "plan.json")


def _entry(**change) -> dict:
    d = _plan().to_dict()
    d["entries"][0].update(change)
    return d


@pytest.mark.parametrize(
    "data, message",
    [
        (_entry(policy={"policy": "no-such-policy"}), "bad policy"),
        (_entry(policy={"policy": "sparse", "window": "wide"}), "bad policy"),
        (_entry(policy={"policy": "sparse", "colour": 3}), "bad policy"),
        (_entry(policy="sparse"), "bad policy"),
        (_entry(site_error="small"), "'site_error' must be a number"),
        (_entry(flops_saved=None), "'flops_saved' must be a number"),
        (_entry(site=3), "'site' must be a string"),
        (_entry(note=["x"]), "'note' must be a string"),
        ({**_plan().to_dict(), "entries": [["a", "list"]]}, "must be an object"),
        ({**_plan().to_dict(), "entries": {"a": 1}}, "'entries' must be an array"),
        ({**_plan().to_dict(), "budget": "5%"}, "'budget' must be a number"),
        ({**_plan().to_dict(), "model_error": "low"}, "'model_error' must be a number"),
        ({**_plan().to_dict(), "notes": "one"}, "'notes' must be an array"),
        ({k: v for k, v in _plan().to_dict().items() if k != "budget"}, "missing the field 'budget'"),
    ],
)
def test_malformed_plan_is_a_plan_error(tmp_path: Path, data: dict, message: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_missing_field_is_named(tmp_path: Path) -> None:
    d = _plan().to_dict()
    del d["entries"][1]["flops_saved"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=r"encoder\.layer\.1\.attention\.self#0.*flops_saved"):
        Plan.load(path)


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "not valid JSON"), (b"\xff\xfe\x00binary", "not a text file"), ("[1, 2]", "not an attnrw plan")],
)
def test_unreadable_file_is_a_plan_error(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PlanError, match=message):
        Plan.load(path)
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "none.json")
    with pytest.raises(PlanError, match="cannot read"):
        Plan.load(tmp_path)
