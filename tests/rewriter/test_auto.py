"""Auto: calibrated per-site plans within a budget; plans that save, load and refuse the wrong model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import attnrw
from attnrw.rewriter.calibrate import attention_flops
from tests.zoo import outputs_to_tensors

SEQ = 64
CANDIDATES = (attnrw.Sparse(window=8, sinks=1), attnrw.Sparse(window=16, sinks=1), attnrw.Sparse(window=32, sinks=1))


def bert_long() -> tuple[torch.nn.Module, tuple, dict]:
    """A small BERT on 64 tokens, long enough for windows to save work (also a CLI factory)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, attn_implementation="eager")
    return BertModel(cfg).eval(), (), _inputs(0)


def _inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (2, SEQ), generator=g)}


def _error(model: torch.nn.Module, policy: object, kwargs: dict) -> float:
    ep = attnrw.rewrite(model, (), _inputs(0), policy=policy)
    with torch.no_grad():
        out = outputs_to_tensors(ep.module()(**kwargs))[0]
        ref = outputs_to_tensors(model(**kwargs))[0]
    return ((out - ref).norm() / ref.norm()).item()


def _cost(plan: attnrw.Plan, sites: list) -> float:
    return sum(attention_flops(s, e.policy) for s, e in zip(sites, plan.entries))


@pytest.mark.parametrize("budget", [0.005, 0.05, 0.5])
def test_plan_within_budget_on_held_out_and_no_costlier_than_uniform(budget: float) -> None:
    model, _, calib = bert_long()
    held_out = _inputs(1)
    auto = attnrw.Auto(budget=budget, candidates=CANDIDATES)
    plan = attnrw.calibrate(model, ((), calib), ((), held_out), policy=auto)
    assert plan.model_error is not None and plan.model_error <= budget
    assert _error(model, plan, held_out) <= budget * (1 + 1e-6)
    sites = attnrw.inspect(model, (), calib).sites
    uniform_ok = [c for c in CANDIDATES if _error(model, c, held_out) <= budget]
    if uniform_ok:
        best_uniform = min(sum(attention_flops(s, c) for s in sites) for c in uniform_ok)
        assert _cost(plan, sites) <= best_uniform
        assert not plan.all_dense


def test_all_dense_only_when_nothing_meets_the_budget() -> None:
    model, _, calib = bert_long()
    plan = attnrw.calibrate(model, ((), calib), policy=attnrw.Auto(budget=1e-9, candidates=CANDIDATES))
    assert plan.all_dense
    assert all("no candidate keeps the model within the budget" in e.note for e in plan.entries)
    assert any("all-Dense plan" in n for n in plan.notes)
    assert "no candidate" in str(plan)


def test_plan_saves_loads_and_reproduces(tmp_path: Path) -> None:
    model, _, calib = bert_long()
    plan = attnrw.calibrate(model, ((), calib), policy=attnrw.Auto(budget=0.05, candidates=CANDIDATES))
    path = plan.save(tmp_path / "plan.json")
    loaded = attnrw.Plan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    data = json.loads(path.read_text())
    assert data["format"] == "attnrw.plan" and data["version"] == 1
    with torch.no_grad():
        a = attnrw.rewrite(model, (), calib, policy=plan).module()(**calib).last_hidden_state
        b = attnrw.rewrite(model, (), calib, policy=loaded).module()(**calib).last_hidden_state
    assert torch.equal(a, b)
    with pytest.raises(FileExistsError):
        plan.save(path)
    data["version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(data))
    with pytest.raises(attnrw.PlanError, match="version"):
        attnrw.Plan.load(tmp_path / "v99.json")


def test_mismatched_plan_names_the_sites() -> None:
    from tests.zoo import ZOO

    model, _, calib = bert_long()
    plan = attnrw.calibrate(model, ((), calib), policy=attnrw.Auto(budget=0.05, candidates=CANDIDATES))
    other, args, kwargs = ZOO["gpt2_eager"]()
    with pytest.raises(attnrw.PlanError, match=r"h\.0\.attn#0.*encoder\.layer\.0\.attention\.self#0"):
        attnrw.rewrite(other, args, kwargs, policy=plan)


def test_compile_auto_and_saved_plan(tmp_path: Path) -> None:
    model, _, calib = bert_long()
    torch._dynamo.reset()
    auto = attnrw.Auto(budget=0.05, candidates=CANDIDATES)
    be = attnrw.backend(auto, inner="eager")
    with torch.no_grad():
        ref = model(**calib).last_hidden_state
        out = torch.compile(model, backend=be)(**calib).last_hidden_state
    (plan,) = be.plans
    assert ((out - ref).norm() / ref.norm()).item() <= 0.05
    path = plan.save(tmp_path / "plan.json")
    torch._dynamo.reset()
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend="attnrw", options={"plan": str(path), "inner": "eager",
                                                               "on_report": reports.append})
    with torch.no_grad():
        again = compiled(**calib).last_hidden_state
    assert torch.allclose(again, out, atol=1e-6)
    assert [d.policy for d in reports[0].decisions] == [e.policy.name for e in plan.entries]
    with pytest.raises(attnrw.ConfigError, match="beside 'plan'"):
        attnrw.parse_options({"plan": str(path), "window": 3})


def test_cli_bench_plot_and_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from attnrw.cli import main

    png, plan = tmp_path / "bench.png", tmp_path / "plan.json"
    code = main(["bench", "tests.rewriter.test_auto:bert_long", "--policy", "auto", "--budget", "0.05",
                 "--repeat", "1", "--plot", str(png), "--plan-out", str(plan)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "speed-up" in out and "Plan: budget 0.05" in out
    img = Image.open(png)
    assert img.size[0] >= 600 and img.size[1] >= 300
    pixels = torch.tensor(list(img.convert("L").getdata()), dtype=torch.float32)
    assert pixels.std() > 10, "the plot must not be blank"
    assert attnrw.Plan.load(plan).budget == 0.05
    rewritten = tmp_path / "m.pt2"
    assert main(["rewrite", "tests.rewriter.test_auto:bert_long", "--plan", str(plan), "-o", str(rewritten)]) == 0
    assert rewritten.is_file()
    assert main(["rewrite", "tests.rewriter.test_auto:bert_long", "--plan", str(plan), "--window", "3",
                 "-o", str(tmp_path / "x.pt2")]) == 2
