"""Auto on the pretrained all-MiniLM-L6-v2: per-site plans vs the best uniform policy, at three budgets.

Real texts (standard-library docstrings of at least S tokens, cut to S, so
no output is padding) are split into a calibration set and a held-out set. For each budget, Auto is
calibrated on the first and checked on the second; the plan's error is then
measured on the held-out set and its speed on one batch, beside every single
uniform candidate. Errors are relative L2 of the model outputs against the
unmodified model, as the budget is defined.

    python benchmarks/bench_auto_minilm.py              # about 10 minutes on 2 cores
    python benchmarks/bench_auto_minilm.py --quick      # 256 tokens, fewer texts
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnrw  # noqa: E402
from attnrw.policies.auto import default_candidates  # noqa: E402
from attnrw.rewriter.calibrate import attention_flops  # noqa: E402
from corpus import batches, minilm, texts  # noqa: E402


def rel_l2(model_fn, ref_fn, data) -> float:
    err2 = ref2 = 0.0
    with torch.no_grad():
        for kw in data:
            out, ref = model_fn(**kw), ref_fn(**kw)
            for a, b in ((out.last_hidden_state, ref.last_hidden_state), (out.pooler_output, ref.pooler_output)):
                err2 += float((a.double() - b.double()).pow(2).sum())
                ref2 += float(b.double().pow(2).sum())
    return (err2 / ref2) ** 0.5


def seconds(fn, kw, repeat: int) -> float:
    with torch.no_grad():
        fn(**kw)
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(**kw)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def speedup(dense, prog, kw, repeat: int) -> float:
    """Dense time over ``prog`` time, each timed right after the other so machine drift cancels."""
    t_prog = seconds(prog, kw, repeat)
    t_dense = seconds(dense, kw, repeat)
    return t_dense / t_prog


def label(p) -> str:
    d = p.to_dict()
    name = d.pop("policy")
    keep = {k: v for k, v in d.items() if k in ("window", "sinks", "recent", "group") or (k == "topk" and v)}
    return f"{name}({', '.join(f'{k}={v}' for k, v in keep.items())})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    seq, batch, n_batches = (256, 4, 2) if args.quick else (512, 4, 3)
    model, tok = minilm()
    passages = texts(tok, 2 * n_batches * batch, min_tokens=seq, max_tokens=seq + 256)
    data = batches(tok, passages, batch, seq, pad=False)
    calib, held = data[:n_batches], data[n_batches:]
    sample = calib[0]
    # Every speed-up is against the Dense rewrite run the same way (an exported
    # program), so it measures the policy, not the graph runner.
    ep_dense = attnrw.rewrite(model, (), sample)
    t_ref = seconds(ep_dense.module(), sample, args.repeat)

    print(f"all-MiniLM-L6-v2 (pretrained), {len(passages)} stdlib texts, batches of {batch} x {seq} tokens, "
          f"{len(calib)} calibration + {len(held)} held-out batches; CPU {torch.get_num_threads()} threads; "
          f"Dense rewrite {t_ref * 1e3:.0f} ms per batch (median of {args.repeat}); speed-ups are against it")
    print(f"dense rewrite: held-out error {rel_l2(ep_dense.module(), model, held):.1e}")

    # Candidates that save no attention work at this length (a window covering
    # the sequence) are dense in disguise; Auto never picks them, nor do we here.
    sites = attnrw.inspect(model, (), sample).sites
    uniform = {}
    for c in default_candidates():
        if sum(attention_flops(st, c) for st in sites) >= sum(attention_flops(st, attnrw.Dense()) for st in sites):
            continue
        prog = attnrw.rewrite(model, (), sample, policy=c).module()
        uniform[c] = (rel_l2(prog, model, held), speedup(ep_dense.module(), prog, sample, args.repeat))
    print("\n| uniform policy | held-out error | speed-up |")
    print("| --- | --- | --- |")
    for c, (e, sp) in uniform.items():
        print(f"| {label(c)} | {e:.2e} | {sp:.2f}× |")

    print("\n| budget | plan (per site) | held-out error | speed-up | best uniform within budget | its speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for budget in (0.005, 0.01, 0.05):
        plan = attnrw.calibrate(model, [((), kw) for kw in calib], [((), kw) for kw in held],
                                policy=attnrw.Auto(budget=budget))
        prog = attnrw.rewrite(model, (), sample, policy=plan).module()
        err, sp = rel_l2(prog, model, held), speedup(ep_dense.module(), prog, sample, args.repeat)
        ok = [(s_, c) for c, (e, s_) in uniform.items() if e <= budget]
        best = max(ok, key=lambda x: x[0]) if ok else None
        sites = ", ".join(label(e.policy) for e in plan.entries)
        print(f"| {budget} | {sites} | {err:.2e} | {sp:.2f}× | "
              f"{label(best[1]) if best else 'none (dense)'} | {best[0] if best else 1.0:.2f}× |")


if __name__ == "__main__":
    main()
