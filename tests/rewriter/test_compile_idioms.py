"""What the compile path must take as export does: in-place score scaling, and every keyword torch.compile passes."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import attnrw
from tests.zoo import ZOO, outputs_to_tensors

EXACT_ATOL = 1e-5


class InPlaceScaled(nn.Module):
    """Scores scaled in place, ``scores /= sqrt(d)`` then ``scores *= c`` (Falcon's multi-query and ALiBi paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        with torch.no_grad():
            self.qkv.weight.mul_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2)
        scores /= math.sqrt(8)
        scores *= 1.5
        return scores.softmax(-1) @ v


def _falcon(alibi: bool) -> tuple[nn.Module, dict]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, alibi=alibi,
        new_decoder_architecture=False, parallel_attn=True, bias=False, use_cache=False, bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.FalconModel._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.h:
            layer.self_attention.query_key_value.weight.mul_(4.0)
    return model, {"input_ids": torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("alibi", [False, True], ids=["multi_query_div_", "alibi_mul_"])
def test_falcon_in_place_scaling_found_under_compile(alibi: bool) -> None:
    model, kwargs = _falcon(alibi)
    exported = attnrw.inspect(model, (), kwargs).sites
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend=attnrw.backend(on_report=reports.append, inner="eager"))
    with torch.no_grad():
        out = compiled(**kwargs).last_hidden_state
        ref = model(**kwargs).last_hidden_state
    assert (out - ref).abs().max().item() <= EXACT_ATOL
    sites = [s for r in reports for s in r.sites]
    assert len(sites) == len(exported) == 2, str(reports[0])
    assert sorted(s.key() for s in sites) == sorted(s.key() for s in exported)
    assert all(r.skipped == [] for r in reports)


def test_in_place_scaled_scores_rewritten_exactly() -> None:
    torch.manual_seed(0)
    model = InPlaceScaled().eval()
    x = torch.randn(2, 10, 16)
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend=attnrw.backend(on_report=reports.append, inner="eager"))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=EXACT_ATOL, rtol=0)
    (site,) = reports[0].sites
    assert site.scale == pytest.approx(1.5 / math.sqrt(8))
    assert [d.op for d in reports[0].decisions] == ["attention"]


def test_mode_reduce_overhead_reaches_inductor(caplog: pytest.LogCaptureFixture) -> None:
    """``mode="reduce-overhead"`` (transformers' CompileConfig default) is taken, and said to be moot on the CPU.

    (torch.compile takes ``mode`` or ``options``, not both; the report comes through the log.)
    """
    model, args, kwargs = ZOO["bert_sdpa"]()
    with caplog.at_level(logging.INFO, logger="attnrw"):
        compiled = torch.compile(model, backend="attnrw", mode="reduce-overhead")
        with torch.no_grad():
            out = outputs_to_tensors(compiled(*args, **kwargs))
            ref = outputs_to_tensors(model(*args, **kwargs))
    assert max((a - b).abs().max().item() for a, b in zip(out, ref)) <= EXACT_ATOL
    assert any("2 rewritten (2×attention)" in r.getMessage() for r in caplog.records)
    assert any("CUDA graphs" in r.getMessage() for r in caplog.records)


def test_mode_with_a_backend_object_and_eager_inner(caplog: pytest.LogCaptureFixture) -> None:
    model, args, kwargs = ZOO["bert_sdpa"]()
    with caplog.at_level(logging.INFO, logger="attnrw"):
        compiled = torch.compile(model, backend=attnrw.backend(inner="eager"), mode="max-autotune")
        with torch.no_grad():
            compiled(*args, **kwargs)
    assert any("ignored with inner='eager'" in r.getMessage() for r in caplog.records)


def test_unknown_mode_is_a_config_error() -> None:
    model, args, kwargs = ZOO["bert_sdpa"]()
    compiled = torch.compile(model, backend="attnrw", mode="fastest-please")
    with pytest.raises(Exception, match="mode 'fastest-please'") as info:
        compiled(*args, **kwargs)
    assert isinstance(getattr(info.value, "inner_exception", info.value), attnrw.ConfigError)


def test_options_given_to_a_backend_object_are_refused() -> None:
    model, args, kwargs = ZOO["bert_sdpa"]()
    compiled = torch.compile(model, backend=attnrw.backend(inner="eager"), options={"policy": "sparse"})
    with pytest.raises(Exception, match="goes with backend='attnrw'"):
        compiled(*args, **kwargs)


class SharedMemoryMutation(nn.Module):
    """An in-place op whose effect a view made before it must see: it cannot become out-of-place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        z = y.view(-1)
        y.mul_(3)
        w = x + 1
        w.add_(5)  # nothing else sees w: this one may become out-of-place
        return z.sum() + w.sum()


def test_in_place_ops_that_others_see_stay_in_place() -> None:
    from attnrw.rewriter.trace import trace_to_aten

    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(trace_to_aten(gm, example_inputs))
        return graphs[-1]

    x = torch.randn(3, 4)
    out = torch.compile(SharedMemoryMutation(), backend=capture)(x)
    torch.testing.assert_close(out, SharedMemoryMutation()(x))
    targets = [n.target for n in graphs[0].graph.nodes]
    assert torch.ops.aten.mul_.Tensor in targets and torch.ops.aten.add_.Tensor not in targets


def test_compile_trace_keeps_symbolic_sizes() -> None:
    """The aten trace a backend matches keeps dynamo's symbolic lengths (a specialised one would be wrong at others)."""
    from attnrw.rewriter.trace import trace_to_aten

    shapes: list[tuple] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        agm = trace_to_aten(gm, example_inputs)
        shapes.extend(tuple(n.meta["val"].shape) for n in agm.graph.nodes
                      if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor))
        return agm

    torch.manual_seed(0)
    model = InPlaceScaled().eval()
    torch.compile(model, backend=capture, dynamic=True)(torch.randn(2, 10, 16))
    assert any(isinstance(d, torch.SymInt) for s in shapes for d in s), shapes
