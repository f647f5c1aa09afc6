"""A zoo of small random-init models with attention, for tests, examples and benchmarks.

Every entry of :data:`ZOO` is a zero-argument factory returning
``(model, args, kwargs)``: a tiny model in eval mode with fixed-seed weights
and example inputs for it, such that ``model(*args, **kwargs)`` runs and
``torch.export.export(model, args, kwargs)`` succeeds. Nothing is downloaded:
the Hugging Face models are built from ``transformers`` configs.

:data:`EXPECTED_SITES` gives, per entry, the number of attention sites (one
per softmax over keys): ``tests/test_zoo.py`` checks it against the softmax
count of the exported program after ``run_decompositions()``.

Hugging Face models come in an ``_eager`` variant (hand-written
matmul / softmax / matmul) and an ``_sdpa`` variant
(``scaled_dot_product_attention``); text models get an ``attention_mask``
with padding in one row, and decoder or encoder-decoder models
``use_cache=False`` (``torch.export`` cannot flatten cache objects).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

Factory = Callable[[], tuple[nn.Module, tuple, dict]]

SEED = 0
BATCH = 2
SEQ = 12
VOCAB = 100
IMAGE = 32
ATTN_IMPLS = ("eager", "sdpa")


def _finish(model: nn.Module, args: tuple, kwargs: dict) -> tuple[nn.Module, tuple, dict]:
    return model.eval(), args, kwargs


def _text_inputs(batch: int = BATCH, seq: int = SEQ, pad: int = 3) -> dict[str, torch.Tensor]:
    """``input_ids`` and an ``attention_mask`` whose last row ends in ``pad`` padding tokens."""
    g = torch.Generator().manual_seed(SEED + 1)
    input_ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[-1, seq - pad :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _pixels(batch: int = BATCH, size: int = IMAGE) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 2)
    return torch.randn(batch, 3, size, size, generator=g)


def _hf(model_cls_name: str, config: Any, attn: str) -> nn.Module:
    """A random-init ``transformers`` model of class ``model_cls_name`` with ``attn_implementation=attn``."""
    import transformers

    torch.manual_seed(SEED)
    cls = getattr(transformers, model_cls_name)
    return cls._from_config(config, attn_implementation=attn)


# --- Hugging Face text encoders -------------------------------------------------------------


def bert(attn: str) -> tuple[nn.Module, tuple, dict]:
    """BERT, 2 layers, hidden 32, 2 heads; padding in the last row."""
    from transformers import BertConfig

    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    return _finish(_hf("BertModel", cfg, attn), (), _text_inputs())


def distilbert(attn: str) -> tuple[nn.Module, tuple, dict]:
    """DistilBERT, 2 layers, dim 32, 2 heads; padding in the last row."""
    from transformers import DistilBertConfig

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)
    return _finish(_hf("DistilBertModel", cfg, attn), (), _text_inputs())


# --- Hugging Face decoders ------------------------------------------------------------------


def gpt2(attn: str) -> tuple[nn.Module, tuple, dict]:
    """GPT-2, 2 layers, hidden 32, 2 heads, causal; padding in the last row."""
    from transformers import GPT2Config

    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    )
    return _finish(_hf("GPT2Model", cfg, attn), (), {**_text_inputs(), "use_cache": False})


def llama(attn: str) -> tuple[nn.Module, tuple, dict]:
    """Llama with grouped-query attention: 2 layers, hidden 64, 4 query heads, 2 key/value heads."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    return _finish(_hf("LlamaModel", cfg, attn), (), {**_text_inputs(), "use_cache": False})


def mistral(attn: str) -> tuple[nn.Module, tuple, dict]:
    """Mistral, GQA (4 / 2 heads) with a sliding window of 4 tokens, shorter than the sequence."""
    from transformers import MistralConfig

    cfg = MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=4, use_cache=False,
    )
    return _finish(_hf("MistralModel", cfg, attn), (), {**_text_inputs(), "use_cache": False})


# --- Hugging Face encoder-decoders ----------------------------------------------------------


def _decoder_ids(seq: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 3)
    return torch.randint(1, VOCAB, (BATCH, seq), generator=g)


def t5(attn: str) -> tuple[nn.Module, tuple, dict]:
    """T5, 2 encoder + 2 decoder layers, d_model 32, 4 heads (encoder self, decoder self, cross)."""
    from transformers import T5Config

    cfg = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, use_cache=False,
    )
    kwargs = {**_text_inputs(), "decoder_input_ids": _decoder_ids(), "use_cache": False}
    return _finish(_hf("T5Model", cfg, attn), (), kwargs)


def bart(attn: str) -> tuple[nn.Module, tuple, dict]:
    """BART, 2 encoder + 2 decoder layers, d_model 32, 2 heads (encoder self, decoder self, cross)."""
    from transformers import BartConfig

    cfg = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False,
    )
    kwargs = {**_text_inputs(), "decoder_input_ids": _decoder_ids(), "use_cache": False}
    return _finish(_hf("BartModel", cfg, attn), (), kwargs)


# --- Hugging Face vision --------------------------------------------------------------------


def vit(attn: str) -> tuple[nn.Module, tuple, dict]:
    """ViT, 32×32 image, 8×8 patches (16 patches + class token), 2 layers, 2 heads."""
    from transformers import ViTConfig

    cfg = ViTConfig(
        image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
    )
    return _finish(_hf("ViTModel", cfg, attn), (_pixels(),), {})


def clip_vision(attn: str) -> tuple[nn.Module, tuple, dict]:
    """CLIP vision tower, 32×32 image, 8×8 patches, 2 layers, 2 heads."""
    from transformers import CLIPVisionConfig

    cfg = CLIPVisionConfig(
        image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
    )
    return _finish(_hf("CLIPVisionModel", cfg, attn), (_pixels(),), {})


def swin(attn: str) -> tuple[nn.Module, tuple, dict]:
    """Swin, 32×32 image, 4×4 patches, window 4; depths (2, 1): stage 1 has a shifted-window block."""
    from transformers import SwinConfig

    cfg = SwinConfig(
        image_size=IMAGE, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 2],
        window_size=4, mlp_ratio=2.0,
    )
    return _finish(_hf("SwinModel", cfg, attn), (_pixels(),), {})


def segformer(attn: str) -> tuple[nn.Module, tuple, dict]:
    """Segformer encoder, 2 blocks of depth 1; block 1 attends to spatially reduced keys (sr_ratio 2)."""
    from transformers import SegformerConfig

    cfg = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
        decoder_hidden_size=32,
    )
    return _finish(_hf("SegformerModel", cfg, attn), (_pixels(),), {})


# --- torch.nn -------------------------------------------------------------------------------


def _padding_mask(batch: int, seq: int, pad: int = 3) -> torch.Tensor:
    """A ``key_padding_mask``: True marks padding, in the last ``pad`` positions of the last row."""
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[-1, seq - pad :] = True
    return mask


def nn_transformer_encoder() -> tuple[nn.Module, tuple, dict]:
    """``nn.TransformerEncoder``: 2 layers, d_model 32, 4 heads, batch_first, key padding mask."""
    torch.manual_seed(SEED)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    src = torch.randn(BATCH, SEQ, 32)
    return _finish(model, (src,), {"src_key_padding_mask": _padding_mask(BATCH, SEQ)})


def nn_transformer_decoder() -> tuple[nn.Module, tuple, dict]:
    """``nn.TransformerDecoder``: 2 layers (self with a causal mask, cross to memory), d_model 32, 4 heads."""
    torch.manual_seed(SEED)
    layer = nn.TransformerDecoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    model = nn.TransformerDecoder(layer, num_layers=2)
    tgt = torch.randn(BATCH, 8, 32)
    memory = torch.randn(BATCH, SEQ, 32)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(8)
    # tgt_is_causal=True: without it the layer compares tgt_mask with a causal mask at run time,
    # a data-dependent branch torch.export cannot trace.
    kwargs = {"tgt_mask": tgt_mask, "tgt_is_causal": True, "memory_key_padding_mask": _padding_mask(BATCH, SEQ)}
    return _finish(model, (tgt, memory), kwargs)


class MHACross(nn.Module):
    """Cross-attention with ``nn.MultiheadAttention``: queries attend to a separate key/value sequence."""

    def __init__(self, embed_dim: int = 32, num_heads: int = 4, batch_first: bool = True) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(embed_dim, num_heads, batch_first=batch_first)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.mha(q, kv, kv, key_padding_mask=key_padding_mask)[0]


def mha_cross(batch_first: bool) -> tuple[nn.Module, tuple, dict]:
    """:class:`MHACross` with 8 queries over 12 keys, padding in the last batch row."""
    torch.manual_seed(SEED)
    model = MHACross(batch_first=batch_first)
    q = torch.randn(BATCH, 8, 32)
    kv = torch.randn(BATCH, SEQ, 32)
    if not batch_first:
        q, kv = q.transpose(0, 1).contiguous(), kv.transpose(0, 1).contiguous()
    return _finish(model, (q, kv), {"key_padding_mask": _padding_mask(BATCH, SEQ)})


# --- registry -------------------------------------------------------------------------------

_HF: dict[str, tuple[Callable[[str], tuple[nn.Module, tuple, dict]], int]] = {
    "bert": (bert, 2),
    "distilbert": (distilbert, 2),
    "gpt2": (gpt2, 2),
    "llama": (llama, 2),
    "mistral": (mistral, 2),
    "t5": (t5, 2 + 2 * 2),
    "bart": (bart, 2 + 2 * 2),
    "vit": (vit, 2),
    "clip_vision": (clip_vision, 2),
    "swin": (swin, 3),
    "segformer": (segformer, 2),
}

ZOO: dict[str, Factory] = {}
EXPECTED_SITES: dict[str, int] = {}

for _name, (_fn, _sites) in _HF.items():
    for _attn in ATTN_IMPLS:
        ZOO[f"{_name}_{_attn}"] = partial(_fn, _attn)
        EXPECTED_SITES[f"{_name}_{_attn}"] = _sites

ZOO.update(
    {
        "nn_transformer_encoder": nn_transformer_encoder,
        "nn_transformer_decoder": nn_transformer_decoder,
        "mha_cross_batch_first": partial(mha_cross, True),
        "mha_cross_seq_first": partial(mha_cross, False),
    }
)
EXPECTED_SITES.update(
    {
        "nn_transformer_encoder": 2,
        "nn_transformer_decoder": 2 * 2,
        "mha_cross_batch_first": 1,
        "mha_cross_seq_first": 1,
    }
)


def outputs_to_tensors(out: Any) -> list[torch.Tensor]:
    """Flatten a model output (tensor, HF ``ModelOutput``, tuple, list, dict) into a list of tensors.

    ``None`` entries and non-tensor leaves are dropped; order follows the
    output's own order, so two outputs of one model line up element by element.
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):  # ModelOutput is an OrderedDict holding only the fields that are set
        return [t for v in out.values() for t in outputs_to_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in outputs_to_tensors(v)]
    return []


def build(name: str) -> tuple[nn.Module, tuple, dict]:
    """Build the zoo entry ``name``; a ``pkg.module:fn`` factory for the CLI (``tests.zoo:bert_eager``)."""
    try:
        factory = ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo entry {name!r}; choose one of {', '.join(ZOO)}") from None
    return factory()


def __getattr__(name: str) -> Factory:
    # ``tests.zoo:bert_eager`` works as a CLI MODEL spec: each entry is also a module attribute.
    if name in ZOO:
        return ZOO[name]
    raise AttributeError(f"module 'tests.zoo' has no attribute {name!r}")


__all__ = ["EXPECTED_SITES", "ZOO", "build", "outputs_to_tensors"]
