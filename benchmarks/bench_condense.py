"""Condensed attention: speed against dense SDPA and Sparse (CPU, fp32), fidelity against Sparse on MiniLM.

    python benchmarks/bench_condense.py [--seqs 8192,16384] [--texts 64] [--skip-fidelity] [--write-results]

Speed (one run, interleaved timings, min over rounds): batch 1, 8 heads,
head_dim 64, fp32, recent 512, group 16, no sinks, bidirectional and
causal, for each S:

* dense ``F.scaled_dot_product_attention`` (``is_causal=True`` on causal rows);
* ``torch.ops.attnrw.sparse_attention(impl="torch")`` with the window whose
  keys per query match the condensed rule's (the smallest window with at
  least as many; about ``recent + S / group``);
* ``torch.ops.attnrw.condensed_attention(impl="torch")``, mean and query pooling.

Each ratio is printed beside its bound: the peer's keys per query over the
condensed rule's (mean over queries, by the rule; what each one attends to,
not what its blocking computes).

Fidelity: the pretrained all-MiniLM-L6-v2 on passages of 512 tokens joined
from standard-library docstrings (``benchmarks/corpus.py``), rewritten
through ``torch.compile(model, backend=attnrw.backend(policy, inner="eager"))``:
mean cosine similarity of the sentence embeddings (mean over tokens) to the
unmodified model, for Condense (recent 64, group 16, [CLS] as the one sink)
and for Sparse with the same keys per query.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attnrw  # noqa: E402
from attnrw.kernels.condense.layout import Geometry, keys_per_query  # noqa: E402
from bench_sparse_kernel import time_interleaved  # noqa: E402

HEADS, DIM, RECENT, GROUP = 8, 64, 512, 16
FID_SEQ, FID_RECENT, FID_GROUP, FID_SINKS = 512, 64, 16, 1
SECTION = "## Condensed attention"


def sparse_keys_per_query(seq: int, window: int, sinks: int, causal: bool) -> float:
    """Mean keys per query under the Sparse rule (band plus sinks, no top-k)."""
    i = torch.arange(seq, dtype=torch.float64)
    if causal:
        lo, hi = (i - window + 1).clamp(min=0), i
    else:
        lo, hi = (i - window // 2).clamp(min=0), (i + window // 2).clamp(max=seq - 1)
    band = hi - lo + 1
    s = min(sinks, seq)
    # Sinks outside the band; causal queries see only sinks j <= i.
    seen_sinks = torch.minimum(i + 1, torch.tensor(float(s))) if causal else torch.full_like(i, float(s))
    overlap = (torch.minimum(hi, torch.tensor(s - 1.0)) - lo + 1).clamp(min=0)
    return float((band + seen_sinks - overlap).mean())


def matched_window(seq: int, target: float, sinks: int, causal: bool) -> int:
    """The smallest Sparse window whose keys per query reach ``target``."""
    lo, hi = 1, 2 * seq + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sparse_keys_per_query(seq, mid, sinks, causal) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def speed_rows(seqs: list[int], threads: list[int], budget_s: float) -> list[dict]:
    sparse = torch.ops.attnrw.sparse_attention
    condensed = torch.ops.attnrw.condensed_attention
    scale = DIM**-0.5
    rows = []
    for causal, seq, n_threads in ((c, s, t) for c in (False, True) for s in seqs for t in threads):
        torch.set_num_threads(n_threads)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, seq, DIM, generator=g) for _ in range(3))
        ck = keys_per_query(Geometry(seq, RECENT, GROUP, 0, causal))
        window = matched_window(seq, ck, 0, causal)
        fns: dict[str, Callable[[], object]] = {
            "dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale),
            "sparse": lambda: sparse(q, k, v, None, causal, scale, window, 0, 0, 64, "torch"),
        }
        for pooling in ("mean", "query"):
            fns[pooling] = lambda p=pooling: condensed(
                q, k, v, None, causal, scale, RECENT, GROUP, 0, p, False, 64, "torch"
            )
        with torch.no_grad():
            times = time_interleaved(fns, min_rounds=2, budget_s=budget_s * seq / 8192)
        rows.append(
            {
                "mode": "causal" if causal else "bidir",
                "seq": seq,
                "threads": n_threads,
                "window": window,
                "times": times,
                "dense_keys": (seq + 1) / 2 if causal else float(seq),
                "sparse_keys": sparse_keys_per_query(seq, window, 0, causal),
                "condense_keys": ck,
            }
        )
        print(f"  timed {rows[-1]['mode']} S={seq} threads={n_threads}", file=sys.stderr)
    return rows


def render_speed(rows: list[dict]) -> str:
    lines = [
        "| mode | S | threads | pooling | condense (ms) | dense SDPA (ms) | dense / condense (bound) "
        "| Sparse window | Sparse (ms) | Sparse / condense (bound) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t = r["times"]
        for pooling in ("mean", "query"):
            c = t[pooling]
            lines.append(
                f"| {r['mode']} | {r['seq']} | {r['threads']} | {pooling} | {c * 1e3:.0f} | {t['dense'] * 1e3:.0f} "
                f"| {t['dense'] / c:.2f}× ({r['dense_keys'] / r['condense_keys']:.2f}×) "
                f"| {r['window']} | {t['sparse'] * 1e3:.0f} "
                f"| {t['sparse'] / c:.2f}× ({r['sparse_keys'] / r['condense_keys']:.2f}×) |"
            )
    return "\n".join(lines)


def fidelity(n_texts: int, batch: int) -> tuple[list[tuple[str, float, float]], float, float, int]:
    """[(policy, mean cosine, min cosine)], condensed and sparse keys per query, the Sparse window."""
    import corpus

    model, tok = corpus.minilm()
    passages = corpus.texts(tok, n_texts, min_tokens=FID_SEQ, max_tokens=2 * FID_SEQ)
    batches = corpus.batches(tok, passages, batch, FID_SEQ, pad=False)

    def embeddings(m: torch.nn.Module) -> torch.Tensor:
        out = []
        for b in batches:
            hidden = m(**b).last_hidden_state
            out.append(corpus.embed(hidden, torch.ones(hidden.shape[:2], dtype=torch.long)))
        return torch.cat(out)

    ck = keys_per_query(Geometry(FID_SEQ, FID_RECENT, FID_GROUP, FID_SINKS, False))
    window = matched_window(FID_SEQ, ck, FID_SINKS, False)
    policies = {
        f"Sparse(window={window}, sinks=1)": attnrw.Sparse(window=window, sinks=FID_SINKS),
    }
    for pooling in ("mean", "query"):
        for size_bias in (False, True):
            name = f"Condense(recent=64, group=16, sinks=1, pooling={pooling!r}, size_bias={size_bias})"
            policies[name] = attnrw.Condense(
                recent=FID_RECENT, group=FID_GROUP, sinks=FID_SINKS, pooling=pooling, size_bias=size_bias
            )
    results = []
    with torch.no_grad():
        ref = embeddings(model)
        for name, policy in policies.items():
            torch._dynamo.reset()
            reports: list[attnrw.Report] = []
            compiled = torch.compile(model, backend=attnrw.backend(policy, on_report=reports.append, inner="eager"))
            emb = embeddings(compiled)
            ops = {d.op for r in reports for d in r.decisions}
            if len([d for r in reports for d in r.decisions]) != 6 or len(ops) != 1 or "attention" in ops:
                raise RuntimeError(f"{name}: expected the 6 MiniLM sites rewritten, got {ops}")
            cos = (emb * ref).sum(-1)
            results.append((name, float(cos.mean()), float(cos.min())))
            print(f"  {name}: {results[-1][1]:.4f}", file=sys.stderr)
    return results, ck, sparse_keys_per_query(FID_SEQ, window, FID_SINKS, False), len(passages)


def render_fidelity(results: list[tuple[str, float, float]], ck: float, sk: float, n: int) -> str:
    lines = [
        f"all-MiniLM-L6-v2 (pretrained), {n} passages of {FID_SEQ} tokens (stdlib docstrings, no padding), "
        f"bidirectional; keys per query: Condense {ck:.1f}, Sparse {sk:.1f} (dense {FID_SEQ}). "
        "Cosine of the mean-pooled sentence embedding to the unmodified model's.",
        "",
        "| policy | mean cosine | min cosine |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{name}` | {mean:.4f} | {low:.4f} |" for name, mean, low in results]
    return "\n".join(lines)


def write_results(body: str) -> Path:
    """Put ``body`` under SECTION in benchmarks/RESULTS.md, replacing only that section."""
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"{SECTION}\n\n{body.rstrip()}\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[nxt:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="8192,16384", help="sequence lengths to time (comma-separated)")
    ap.add_argument(
        "--threads", default=f"1,{torch.get_num_threads()}", help="torch CPU threads to time with (comma-separated)"
    )
    ap.add_argument("--budget", type=float, default=12.0, help="seconds of timing per row at S=8192 (scaled with S)")
    ap.add_argument("--texts", type=int, default=64, help="MiniLM passages for the fidelity measurement")
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--write-results", action="store_true", help="record the tables in benchmarks/RESULTS.md")
    args = ap.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    threads = sorted({int(t) for t in args.threads.split(",")})
    all_threads = torch.get_num_threads()
    started = time.perf_counter()
    command = " ".join(["python benchmarks/bench_condense.py", *sys.argv[1:]])
    head = f"Date: {datetime.date.today().isoformat()}. Command: `{command}`"
    machine = (
        f"torch {torch.__version__}, {platform.machine()}, {all_threads} cores shared with other jobs: read times "
        "as ratios. One thread is the steadier measure there: the many short parallel regions of the "
        "chunked paths lose more than one long SDPA call when another process takes a core."
    )
    speed = (
        f"CPU, fp32, batch 1, {HEADS} heads, head_dim {DIM}, recent {RECENT}, group {GROUP}, no sinks, block 64, "
        "impl='torch'; min over interleaved rounds. Sparse: window matched to the condensed keys per query "
        "(`recent + S/group`-ish), no sinks, no top-k. Bound = peer keys per query / condensed keys per query.\n\n"
        + render_speed(speed_rows(seqs, threads, args.budget))
    )
    torch.set_num_threads(all_threads)
    parts = [head, machine, "", "### Speed", "", speed]
    if not args.skip_fidelity:
        parts += ["", "### Fidelity at equal cost", "", render_fidelity(*fidelity(args.texts, batch=8))]
    body = "\n".join(parts)
    print(body)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.write_results:
        print("wrote", write_results(body))


if __name__ == "__main__":
    main()
