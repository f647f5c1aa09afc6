"""Public models with the idioms the matcher learned, built from ``transformers`` configs (random weights).

A second zoo beside :mod:`tests.zoo`, for ``tests/test_idiom_models.py``:
every entry of :data:`IDIOM_MODELS` is a zero-argument factory returning
``(model, args, kwargs)`` (so ``attnrw inspect tests.idiom_models:NAME``
works), in float32 and eval mode. Nothing is downloaded.

Random initialisation (std 0.02) gives scores of ~1e-3 and a near-uniform
softmax, under which a wrong rewrite (a transposed product, a scale applied
twice, a window on the wrong axis) would still agree with the model. Each
factory therefore sharpens attention: it multiplies the query and key
projections by :data:`QK_GAIN` (or raises Swin-v2's per-head
``logit_scale`` to log(50), the largest it may be), and
``tests/test_idiom_models.py`` checks that the mean top probability of every
model is well above uniform before it trusts an equality.

:data:`SPECS` says per entry how many sites it has (one per softmax), how
many Sparse may take (sites proven to be one sequence attending to itself),
and whether onnxruntime can run a plain export of it at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tests.zoo import BATCH, SEED, SEQ, VOCAB, Factory
from tests.zoo import _hf as zoo_hf
#: Gain on the q/k projection weights: scores grow by QK_GAIN**2 (see the module docstring).
QK_GAIN = 4.0


@dataclass(frozen=True)
class Spec:
    """What a model of :data:`IDIOM_MODELS` is expected to show."""

    #: Where the idiom comes from, and which one it is.
    idiom: str
    sites: int
    #: Sites Sparse lowers (proven self-attention over tokens); the others stay dense with a reason.
    aligned: int
    #: ``"ok"``, or ``"exporter-limit"`` where a plain ``torch.onnx.export`` of the unmodified model fails too
    #: (on these models only with the padding mask: without ``attention_mask`` they export).
    onnx: str = "ok"
    #: How close the float64 Dense rewrite is to the model: 1e-9 unless the model computes part of attention in
    #: float32 itself (then the rewrite, all float64, is the more accurate of the two).
    atol: float = 1e-9
    #: Whether the model exports with a dynamic sequence length (Funnel's pooling fixes it; images have none).
    dynamic: bool = True


def _hf(cls_name: str, config: Any) -> nn.Module:
    return zoo_hf(cls_name, config, "eager").eval()


def _gain(model: nn.Module, suffixes: Iterable[str], gain: float = QK_GAIN) -> nn.Module:
    """Multiply every parameter whose name ends in one of ``suffixes`` by ``gain``."""
    suffixes = tuple(suffixes)
    hit = False
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(suffixes):
                p.mul_(gain)
                hit = True
    if not hit:
        raise AssertionError(f"no parameter of {type(model).__name__} ends in {suffixes}")
    return model


def text_inputs(pad: int, seq: int = SEQ, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """``input_ids`` drawn afresh per length and an ``attention_mask`` whose last row ends in ``pad``
    padding tokens."""
    g = torch.Generator().manual_seed(SEED + seq)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - pad :] = 0
    return {"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g), "attention_mask": mask}


def funnel() -> tuple[nn.Module, tuple, dict]:
    """HF Funnel: P·V as ``einsum("bnij,bjnd->bind")`` on permuted operands; pooled blocks attend from fewer queries."""
    from transformers import FunnelConfig

    cfg = FunnelConfig(vocab_size=VOCAB, block_sizes=[1, 1], block_repeats=[1, 1], num_decoder_layers=1, d_model=32,
                       n_head=2, d_head=16, d_inner=64, max_position_embeddings=64)
    model = _gain(_hf("FunnelModel", cfg), ("q_head.weight", "k_head.weight"))
    return model, (), text_inputs(pad=3)


def xlnet() -> tuple[nn.Module, tuple, dict]:
    """HF XLNet: content and position scores by ``einsum("ibnd,jbnd->bnij")``, P·V by ``einsum("bnij,jbnd->ibnd")``."""
    from transformers import XLNetConfig

    cfg = XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, d_inner=64, use_mems_eval=False)
    # XLNet has no norm before its first layer: the embeddings (std 0.02) are raised to std 1 as well.
    model = _gain(_hf("XLNetModel", cfg), ("rel_attn.q", "rel_attn.k"), 3 * QK_GAIN)
    _gain(model, ("word_embedding.weight",), 50.0)
    return model, (), text_inputs(pad=3)


def squeezebert() -> tuple[nn.Module, tuple, dict]:
    """HF SqueezeBERT: q, k, v from grouped ``Conv1d`` in (N, C, W) layout."""
    from transformers import SqueezeBertConfig

    cfg = SqueezeBertConfig(vocab_size=VOCAB, hidden_size=32, embedding_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, q_groups=2, k_groups=2, v_groups=2,
                            post_attention_groups=1, intermediate_groups=2, output_groups=2)
    model = _gain(_hf("SqueezeBertModel", cfg), ("attention.query.weight", "attention.key.weight"), 24.0)
    return model, (), text_inputs(pad=3)


def _falcon(alibi: bool) -> nn.Module:
    from transformers import FalconConfig

    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       multi_query=True, alibi=alibi, new_decoder_architecture=False, parallel_attn=True, bias=False,
                       use_cache=False, bos_token_id=0, eos_token_id=0)
    return _gain(_hf("FalconModel", cfg), ("query_key_value.weight",))


def falcon_mqa() -> tuple[nn.Module, tuple, dict]:
    """HF Falcon, multi-query: one key/value head broadcast by ``matmul`` against every query head; causal."""
    return _falcon(alibi=False), (), text_inputs(pad=3)


def falcon_alibi() -> tuple[nn.Module, tuple, dict]:
    """HF Falcon with ALiBi: in-place ``scores *= inv_norm`` and a per-head linear bias; causal."""
    return _falcon(alibi=True), (), text_inputs(pad=3)


def swinv2() -> tuple[nn.Module, tuple, dict]:
    """HF Swin-v2: cosine attention, normalised q and k times ``exp(clamp(logit_scale))``, one scale per head."""
    from transformers import Swinv2Config

    cfg = Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    model = _hf("Swinv2Model", cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(math.log(50.0))  # the clamp's upper end: cosine scores in [-50, 50]
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(SEED + 2))
    return model, (), {"pixel_values": pixels}


#: Gemma 2's logit softcap, small enough that the sharpened scores reach it.
GEMMA2_SOFTCAP = 5.0


def gemma2() -> tuple[nn.Module, tuple, dict]:
    """HF Gemma 2: ``tanh(s / cap) * cap`` on the scores before the mask; GQA, causal."""
    from transformers import Gemma2Config

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       use_cache=False, attn_logit_softcapping=GEMMA2_SOFTCAP, final_logit_softcapping=None,
                       sliding_window=64)
    model = _gain(_hf("Gemma2Model", cfg), ("q_proj.weight", "k_proj.weight"), 3 * QK_GAIN)
    return model, (), {**text_inputs(pad=3), "use_cache": False}


def deberta_v2() -> tuple[nn.Module, tuple, dict]:
    """HF DeBERTa-v2: relative position scores, ``masked_fill(finfo.min)``: padded query rows are uniform."""
    from transformers import DebertaV2Config

    cfg = DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                          position_buckets=16, pos_att_type=["p2c", "c2p"])
    model = _gain(_hf("DebertaV2Model", cfg), ("query_proj.weight", "key_proj.weight"), 24.0)
    return model, (), text_inputs(pad=4)


class NearMisses(nn.Module):
    """One plain attention, one with heads mixed after the softmax (talking heads), and a softmax over classes.

    Only the first is attention attnrw may rewrite; ``inspect`` must list the
    other two softmaxes as skipped, each with its reason.
    """

    def __init__(self, dim: int = 16, heads: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.plain = nn.Linear(dim, 3 * dim)
        self.talking = nn.Linear(dim, 3 * dim)
        self.mix = nn.Parameter(torch.eye(heads) + 0.5)  # Shazeer et al. 2020
        self.head = nn.Linear(dim, classes)

    def _qkv(self, proj: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, e = x.shape
        q, k, v = proj(x).view(b, s, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, e = x.shape
        q, k, v = self._qkv(self.plain, x)
        x = x + (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // self.heads), -1) @ v).transpose(1, 2).reshape(b, s, e)
        q, k, v = self._qkv(self.talking, x)
        probs = torch.einsum("bhqk,hg->bgqk", torch.softmax(q @ k.transpose(-1, -2), -1), self.mix)
        x = x + (probs @ v).transpose(1, 2).reshape(b, s, e)
        return torch.softmax(self.head(x.mean(1)), -1)


def near_misses() -> tuple[nn.Module, tuple, dict]:
    """:class:`NearMisses` on (2, 12, 16)."""
    torch.manual_seed(SEED)
    return NearMisses().eval(), (torch.randn(BATCH, SEQ, 16, generator=torch.Generator().manual_seed(SEED)),), {}


IDIOM_MODELS: dict[str, Factory] = {
    "funnel": funnel,
    "xlnet": xlnet,
    "squeezebert": squeezebert,
    "falcon_mqa": falcon_mqa,
    "falcon_alibi": falcon_alibi,
    "swinv2": swinv2,
    "gemma2": gemma2,
    "deberta_v2": deberta_v2,
}

SPECS: dict[str, Spec] = {
    # Funnel casts its scores to float32 before the softmax (modeling_funnel: ``attn_score.float()``).
    "funnel": Spec("permuted einsum operands (item 1)", sites=3, aligned=2, dynamic=False, atol=1e-5),
    "xlnet": Spec("permuted einsum operands (item 1)", sites=2, aligned=2, onnx="exporter-limit"),
    "squeezebert": Spec("grouped Conv1d projections (item 3)", sites=2, aligned=2),
    "falcon_mqa": Spec("one key/value head broadcast by matmul (item 3)", sites=2, aligned=2),
    "falcon_alibi": Spec("in-place scaling, ALiBi (item 8)", sites=2, aligned=2, onnx="exporter-limit"),
    "swinv2": Spec("per-head tensor scale (item 4)", sites=4, aligned=4, dynamic=False),
    # HF's eager attention takes the softmax in float32 whatever the model's dtype.
    "gemma2": Spec("logit softcap (item 5)", sites=2, aligned=2, atol=1e-5),
    "deberta_v2": Spec("fully-masked query rows (item 6)", sites=2, aligned=2),
}
