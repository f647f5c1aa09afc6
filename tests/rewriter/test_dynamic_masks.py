"""A graph traced at one length and run at others: masks are never dropped on what one length shows.

A sliding window of width W equals the causal pattern while the sequence is
at most W long. A graph compiled with symbolic lengths (``dynamic=True``, or
automatic dynamic after a second length) runs at every length, so a mask
classified by evaluating it at the traced length alone would lose its window
at longer ones. Each model here is traced at 12 tokens (within its window of
16) and run at 4x that; Dense, and a Sparse whose own window covers every
length (so it must be exact too), match the unmodified model.
"""

from __future__ import annotations

import pytest
import torch

import attnrw

transformers = pytest.importorskip("transformers")

#: fp32 exact rewrites (DESIGN.md).
EXACT_ATOL = 1e-5
WINDOW = 16
TRACED = 12  # within the window: the band and the causal pattern agree here
LONG = 4 * TRACED


def _sharpen(model: torch.nn.Module) -> torch.nn.Module:
    # Random-init attention is near uniform; larger q/k weights make a dropped
    # window (or any other wrong mask) show far above the tolerance.
    with torch.no_grad():
        for mod in model.modules():
            for name in ("q_proj", "k_proj"):
                if hasattr(mod, name):
                    getattr(mod, name).weight.mul_(4.0)
    return model.eval()


def mistral(attn: str) -> torch.nn.Module:
    cfg = transformers.MistralConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=WINDOW, use_cache=False,
    )
    torch.manual_seed(0)
    return _sharpen(transformers.MistralModel._from_config(cfg, attn_implementation=attn))


def gpt_neo(attn: str) -> torch.nn.Module:
    cfg = transformers.GPTNeoConfig(
        vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=WINDOW, max_position_embeddings=128, use_cache=False, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return _sharpen(transformers.GPTNeoModel._from_config(cfg, attn_implementation=attn))


def gemma2(attn: str) -> torch.nn.Module:
    # Softcapping off: a tanh between the product and the softmax is not plain attention.
    cfg = transformers.Gemma2Config(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=WINDOW, use_cache=False,
        attn_logit_softcapping=None, final_logit_softcapping=None,
    )
    torch.manual_seed(0)
    return _sharpen(transformers.Gemma2Model._from_config(cfg, attn_implementation=attn))


# GPT-Neo and Gemma2 have no SDPA implementation in transformers 5.
MODELS = {
    "mistral_eager": (mistral, "eager"),
    "mistral_sdpa": (mistral, "sdpa"),
    "gpt_neo_eager": (gpt_neo, "eager"),
    "gemma2_eager": (gemma2, "eager"),
}

POLICIES = {"dense": attnrw.Dense(), "sparse_covering": attnrw.Sparse(window=4 * LONG, sinks=4)}


def _inputs(seq: int, pad: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seq)
    kw = {"input_ids": torch.randint(1, 100, (2, seq), generator=g)}
    if pad:
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, -3:] = 0
        kw["attention_mask"] = mask
    return kw


def _run(name: str, policy: attnrw.Policy, dynamic: bool | None, lengths: tuple[int, ...], pad: bool) -> list:
    factory, attn = MODELS[name]
    model = factory(attn)
    reports: list[attnrw.Report] = []
    compiled = torch.compile(
        model, backend=attnrw.backend(policy, on_report=reports.append, inner="eager"), dynamic=dynamic
    )
    with torch.no_grad():
        for seq in lengths:
            kw = _inputs(seq, pad)
            ref = model(**kw).last_hidden_state
            out = compiled(**kw).last_hidden_state
            err = (out - ref).abs().max().item()
            assert err <= EXACT_ATOL, f"{name} at length {seq}: max abs error {err:.3g}"
    return reports


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_dynamic_true_keeps_the_window(name: str, policy: str) -> None:
    reports = _run(name, POLICIES[policy], True, (TRACED, LONG), pad=False)
    assert len(reports) == 1, "one graph with a symbolic length serves both lengths"
    sites = reports[0].sites
    assert sites, str(reports[0])
    # Every model here has at least one windowed layer: its mask is kept, not turned into is_causal.
    assert any(s.mask == "causal+mask" for s in sites), str(reports[0])
    assert all(s.causal for s in sites)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_automatic_dynamic_keeps_the_window(name: str) -> None:
    # The second length makes dynamo recompile with a symbolic length, reused for the third.
    reports = _run(name, attnrw.Dense(), None, (TRACED, TRACED + 2, LONG), pad=False)
    assert len(reports) == 2
    assert any(s.mask == "causal+mask" for s in reports[1].sites), str(reports[1])


@pytest.mark.parametrize("name", ["mistral_eager", "mistral_sdpa"])
def test_padding_with_dynamic_length(name: str) -> None:
    reports = _run(name, POLICIES["sparse_covering"], True, (TRACED, LONG), pad=True)
    # Causal is proven from the position comparison the padding is ANDed with.
    assert all(s.causal and s.mask == "causal+padding" for s in reports[0].sites), str(reports[0])


def test_plain_causal_mask_still_becomes_is_causal() -> None:
    """Llama's mask is causal at every length: with a symbolic length it is still replaced by is_causal."""
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
    )
    torch.manual_seed(0)
    model = _sharpen(transformers.LlamaModel._from_config(cfg, attn_implementation="eager"))
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend=attnrw.backend(on_report=reports.append, inner="eager"), dynamic=True)
    with torch.no_grad():
        for seq in (TRACED, LONG):
            kw = _inputs(seq, pad=False)
            err = (compiled(**kw).last_hidden_state - model(**kw).last_hidden_state).abs().max().item()
            assert err <= EXACT_ATOL
    (site,) = reports[0].sites
    assert site.mask == "causal" and site.causal


def test_export_with_dynamic_shapes_sees_the_window() -> None:
    model = mistral("eager")
    kw = _inputs(TRACED, pad=False)
    seq = torch.export.Dim("seq", min=2, max=128)
    ep = attnrw.rewrite(model, (), kw, dynamic_shapes={"input_ids": {1: seq}})
    with torch.no_grad():
        for n in (TRACED, LONG):
            kw = _inputs(n, pad=False)
            err = (ep.module()(**kw).last_hidden_state - model(**kw).last_hidden_state).abs().max().item()
            assert err <= EXACT_ATOL
    report = attnrw.inspect(ep)
    assert {s.mask for s in report.sites} <= {"causal+mask"}
