"""Sparse attention kernel: attnrw's torch path vs dense SDPA and FlexAttention (CPU, fp32).

    python benchmarks/bench_sparse_kernel.py [--quick] [--block-sizes 32,64,128]

CPU rows: batch 1, 8 heads, head_dim 64, window 256, 4 sinks, bidirectional
and causal, S in {2048, 4096, 8192, 16384} (``--quick``: 2048 and 8192).
Timed, interleaved so that load from other processes hits all alike:

* dense ``F.scaled_dot_product_attention`` (``is_causal=True`` on causal rows);
* FlexAttention (``torch.compile(flex_attention, dynamic=True)``, compiled
  once and reused across shapes) with the same mask through ``create_block_mask``;
* ``torch.ops.attnrw.sparse_attention(impl="torch")`` at each block size.

Each ratio is printed beside its bound: keys per query the peer computes /
keys per query attnrw computes (dense: S, or (S+1)/2 causal; Flex: the
non-empty blocks of its block mask; attnrw: the key slots of one query
block). A ratio above its bound means attnrw also runs faster per key.

On a machine with CUDA it then times the Triton kernel against FlexAttention
and SDPA in bf16 up to S=32768 and reports TFLOP/s over the blocks each one
computes. Timings are min over repeats; read them as ratios.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Inductor's pool of compile workers would compete with the timings for the few cores.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attnrw  # noqa: E402,F401  (registers torch.ops.attnrw.*)
from attnrw.kernels.sparse.layout import band_reach, cdiv  # noqa: E402

HEADS, DIM, WINDOW, SINKS = 8, 64, 256, 4
FLEX_BLOCK = 128  # FlexAttention's default block size


def attnrw_keys_per_query(seq: int, block_size: int, window: int, sinks: int, causal: bool) -> int:
    """Key slots one query block of the torch path attends to (what it computes per query)."""
    before, after = band_reach(seq, block_size, window, causal)
    eff = min(sinks, seq)
    row_sinks = eff if eff <= block_size else 0
    return (before + after + 1) * (block_size + row_sinks) + (eff - row_sinks)


def dense_keys_per_query(seq: int, causal: bool) -> float:
    return (seq + 1) / 2 if causal else float(seq)


def mask_mod_for(window: int, sinks: int, causal: bool) -> Callable:
    """FlexAttention mask_mod of the same rule as attnrw::sparse_attention (no top-k)."""
    if causal:

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sinks))

    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return ((q_idx - kv_idx).abs() <= window // 2) | (kv_idx < sinks)

    return mask_mod


def flex_keys_per_query(block_mask) -> float:
    """Keys per query Flex computes: the non-empty (full or partial) blocks of its block mask."""
    return (1.0 - block_mask.sparsity() / 100.0) * block_mask.seq_lengths[1]


def time_interleaved(
    fns: dict[str, Callable[[], object]], min_rounds: int, budget_s: float, slice_s: float = 0.3
) -> dict[str, float]:
    """Min wall time per call of each function.

    Rounds go through the functions in turn (so load from other processes
    falls on all of them alike); in a round each function runs for about
    ``slice_s`` (at least once). Rounds repeat until ``budget_s`` is spent,
    and at least ``min_rounds`` times. One warm-up call each first.
    """
    best = {name: math.inf for name in fns}
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < budget_s:
        for name, fn in fns.items():
            t_slice = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                best[name] = min(best[name], t1 - t0)
                if t1 - t_slice >= slice_s:
                    break
        rounds += 1
    return best


def cpu_rows(seqs: list[int], block_sizes: list[int], flex_max_seq: int) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # dynamic=True: one compile serves every length (a static compile per shape costs seconds each).
    flex = torch.compile(flex_attention, dynamic=True)
    op = torch.ops.attnrw.sparse_attention
    rows = []
    for causal in (False, True):
        for seq in seqs:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, HEADS, seq, DIM, generator=g) for _ in range(3))
            scale = DIM**-0.5
            fns: dict[str, Callable[[], object]] = {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale),
            }
            bm = None
            if seq <= flex_max_seq:
                bm = create_block_mask(mask_mod_for(WINDOW, SINKS, causal), None, None, seq, seq, device="cpu")
                fns["flex"] = lambda: flex(q, k, v, block_mask=bm, scale=scale)
            for bs in block_sizes:
                fns[f"attnrw@{bs}"] = (
                    lambda bs=bs: op(q, k, v, None, causal, scale, WINDOW, SINKS, 0, bs, "torch")
                )
            with torch.no_grad():
                # Check the rewrite computes what Flex computes before timing it.
                err = None
                if bm is not None:
                    ref = flex(q, k, v, block_mask=bm, scale=scale)
                    err = max((op(q, k, v, None, causal, scale, WINDOW, SINKS, 0, bs, "torch") - ref).abs().max().item() for bs in block_sizes)
                # The dense calls are long enough that two rounds settle them; the short
                # ones need many calls to find a quiet moment on a shared machine.
                times = time_interleaved(fns, min_rounds=2, budget_s=min(15.0, 2.0 * seq / 1024))
            rows.append(
                {
                    "mode": "causal" if causal else "bidir",
                    "seq": seq,
                    "times": times,
                    "dense_keys": dense_keys_per_query(seq, causal),
                    "flex_keys": flex_keys_per_query(bm) if bm is not None else None,
                    "attnrw_keys": {bs: attnrw_keys_per_query(seq, bs, WINDOW, SINKS, causal) for bs in block_sizes},
                    "max_err_vs_flex": err,
                }
            )
            print(f"  done {rows[-1]['mode']} S={seq}", file=sys.stderr, flush=True)
    return rows


def render_cpu(rows: list[dict], block_sizes: list[int]) -> str:
    out = []
    head = (
        "| mode | S | SDPA s | Flex s | "
        + " | ".join(f"attnrw bs={bs} s" for bs in block_sizes)
        + " | best bs | vs SDPA (bound) | vs Flex (bound) | max abs diff vs Flex |"
    )
    out.append(head)
    out.append("|" + " --- |" * (head.count("|") - 1))
    for r in rows:
        t = r["times"]
        best_bs = min(block_sizes, key=lambda bs: t[f"attnrw@{bs}"])
        ours = t[f"attnrw@{best_bs}"]
        keys = r["attnrw_keys"][best_bs]
        vs_dense = f"{t['sdpa'] / ours:.1f}× ({r['dense_keys'] / keys:.1f}×)"
        if "flex" in t:
            flex_s = f"{t['flex']:.3f}"
            vs_flex = f"{t['flex'] / ours:.2f}× ({r['flex_keys'] / keys:.2f}×)"
            err = f"{r['max_err_vs_flex']:.1e}"
        else:
            flex_s, vs_flex, err = "skipped", "–", "–"
        cells = [r["mode"], str(r["seq"]), f"{t['sdpa']:.3f}", flex_s]
        cells += [f"{t[f'attnrw@{bs}']:.3f}" for bs in block_sizes]
        cells += [str(best_bs), vs_dense, vs_flex, err]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def gpu_section(quick: bool) -> str:
    """Triton kernel vs FlexAttention vs SDPA in bf16 on CUDA, with TFLOP/s over computed blocks."""
    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    op = torch.ops.attnrw.sparse_attention
    heads, dim, bs = 16, 128, 64
    lines = [
        f"GPU {torch.cuda.get_device_name()}: bf16, batch 1, {heads} heads, head_dim {dim}, window {WINDOW}, "
        f"sinks {SINKS}, block {bs}. TFLOP/s = 4·H·D·(query, key) pairs in the blocks each computes / time.",
        "",
        "| mode | S | SDPA ms | Flex ms | attnrw Triton ms | SDPA TFLOP/s | Flex TFLOP/s | Triton TFLOP/s | vs SDPA | vs Flex |",
        "|" + " --- |" * 10,
    ]
    seqs = [4096, 16384] if quick else [4096, 8192, 16384, 32768]
    for causal in (False, True):
        for seq in seqs:
            q, k, v = (torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            bm = create_block_mask(mask_mod_for(WINDOW, SINKS, causal), None, None, seq, seq, device="cuda")
            t_sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            t_flex = triton.testing.do_bench(lambda: flex(q, k, v, block_mask=bm))
            t_tri = triton.testing.do_bench(lambda: op(q, k, v, None, causal, dim**-0.5, WINDOW, SINKS, 0, bs, "triton"))
            flops_per_pair = 4 * heads * dim
            pairs_sdpa = seq * dense_keys_per_query(seq, causal)
            pairs_flex = seq * flex_keys_per_query(bm)
            pairs_tri = seq * triton_keys_per_query(seq, bs, WINDOW, SINKS, causal)
            tf = lambda pairs, ms: flops_per_pair * pairs / (ms * 1e-3) / 1e12  # noqa: E731
            lines.append(
                f"| {'causal' if causal else 'bidir'} | {seq} | {t_sdpa:.3f} | {t_flex:.3f} | {t_tri:.3f} | "
                f"{tf(pairs_sdpa, t_sdpa):.0f} | {tf(pairs_flex, t_flex):.0f} | {tf(pairs_tri, t_tri):.0f} | "
                f"{t_sdpa / t_tri:.1f}× | {t_flex / t_tri:.2f}× |"
            )
    return "\n".join(lines)


def triton_keys_per_query(seq: int, block_size: int, window: int, sinks: int, causal: bool) -> float:
    """Average keys per query the Triton kernel visits (its sink range plus its tile's band range)."""
    block_m = min(max(16, 1 << (block_size - 1).bit_length()), 64)
    total = 0
    for row0 in range(0, seq, block_m):
        last = min(row0 + block_m, seq) - 1
        back, ahead = (window - 1, 0) if causal else (window // 2, window // 2)
        lo, hi = max(row0 - back, min(sinks, seq)), min(last + ahead, seq - 1)
        total += (min(sinks, seq) + max(0, hi - lo + 1)) * (last - row0 + 1)
    return total / seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="S in {2048, 8192} only")
    ap.add_argument("--block-sizes", default="32,64,128", help="attnrw block sizes to time (comma-separated)")
    ap.add_argument("--flex-max-seq", type=int, default=16384, help="skip FlexAttention above this length")
    args = ap.parse_args()
    block_sizes = [int(b) for b in args.block_sizes.split(",")]
    seqs = [2048, 8192] if args.quick else [2048, 4096, 8192, 16384]
    torch.manual_seed(0)
    started = time.perf_counter()
    print(
        f"# {datetime.date.today().isoformat()}  torch {torch.__version__}  {platform.processor() or platform.machine()}"
        f"  threads {torch.get_num_threads()}"
    )
    print(
        f"CPU, fp32, batch 1, {HEADS} heads, head_dim {DIM}, window {WINDOW}, sinks {SINKS}, topk 0; "
        "times in seconds (min over interleaved repeats); ratio (bound) = peer time / attnrw time "
        "(peer keys per query / attnrw keys per query), attnrw at its best block size.\n"
    )
    rows = cpu_rows(seqs, block_sizes, args.flex_max_seq)
    print(render_cpu(rows, block_sizes))
    if torch.cuda.is_available():
        print()
        print(gpu_section(args.quick))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
