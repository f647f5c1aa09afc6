"""Embedding fidelity only (no timing) of Merge settings on the pretrained all-MiniLM-L6-v2.

A quick way to compare schedules at equal cost before timing them with
``bench_merge_minilm.py``: texts from the standard library (benchmarks/corpus.py),
sorted by length, batches of ``--batch`` padded to the next multiple of
``--bucket`` tokens (at most 512), each setting applied with ``attnrw.rewrite``
(one exported program per length) and compared with the unmodified model by
the cosine of the sentence embeddings (mean pooling, L2-normalised).

    python benchmarks/scan_merge_quality.py --mode tokens "0.1" "[0.1,0.1,0.1,0.1,0.1,0]" "[0.05,0.1,0.15,0.15,0.15,0.15]"
    python benchmarks/scan_merge_quality.py --mode tokens --count r --texts 48 --min-tokens 200 --max-tokens 256 \\
        --bucket 256 "[0,0,0,32,32,32]"

Each SETTING is a Python literal: a number (every site) or a list (one value per site).
It also prints the mean over sites of the tokens each layer keeps relative to N
(the share of token-layer work left), so settings of equal cost can be compared.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

import attnrw  # noqa: E402
from corpus import embed, minilm, texts  # noqa: E402


def work_left(setting: float | list[float], sites: int = 6) -> float:
    """Mean over layers of the fraction of tokens each layer runs on, for compounding ratios (tokens mode)."""
    ratios = setting if isinstance(setting, list) else [setting] * sites
    kept, total = 1.0, 0.0
    for r in ratios:
        kept *= 1 - r
        total += kept
    return total / len(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("settings", nargs="+", help="ratio (or count) per site: a number or a list literal")
    ap.add_argument("--mode", default="tokens", choices=("kv", "qkv", "tokens"))
    ap.add_argument("--count", choices=("ratio", "r"), default="ratio", help="settings are ratios or token counts")
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--min-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bucket", type=int, default=128)
    args = ap.parse_args()
    settings = [ast.literal_eval(s) for s in args.settings]

    model, tok = minilm()
    passages = sorted(texts(tok, args.texts, args.min_tokens, args.max_tokens), key=lambda p: len(tok.tokenize(p)))
    batches = []
    for i in range(0, len(passages), args.batch):
        chunk = passages[i:i + args.batch]
        longest = max(len(tok.tokenize(p)) for p in chunk) + 2
        length = min(512, -(-longest // args.bucket) * args.bucket)
        enc = tok(chunk, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    print(f"command: {' '.join(sys.argv)}")
    print(f"{len(passages)} texts, batches padded to {[b['input_ids'].shape[1] for b in batches]}, "
          f"padding {1 - real / total:.1%}")

    def run(fn) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([embed(fn(**b).last_hidden_state, b["attention_mask"]) for b in batches])

    ref = run(model)
    for setting in settings:
        programs: dict[int, torch.nn.Module] = {}
        policy = attnrw.Merge(mode=args.mode, **{args.count: setting})

        def fn(**b):
            length = b["input_ids"].shape[1]
            if length not in programs:
                programs[length] = attnrw.rewrite(model, (), b, policy=policy).module()
            return programs[length](**b)

        cos = (run(fn) * ref).sum(-1)
        left = f", token-layer work left {work_left(setting):.3f}" if args.count == "ratio" else ""
        print(f"{args.mode} {args.count}={setting}: cos mean {cos.mean():.4f} p5 {cos.quantile(0.05):.4f}{left}",
              flush=True)


if __name__ == "__main__":
    main()
