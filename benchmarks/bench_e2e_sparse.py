"""End to end on the CPU: a Llama-style decoder compiled by Inductor, dense vs attnrw's Sparse policy.

The model is built from a ``transformers`` config (random init, no download):
4 layers, hidden 512, 8 query heads, 2 key/value heads. The script times
``torch.compile(model)`` and ``torch.compile(model, backend="attnrw",
options=sparse)`` at one sequence length, prints the speed-up and the share of
time attention takes in the dense run (measured by timing the model with
attention replaced by a no-op), so the speed-up can be read against its
Amdahl bound: 1 / (1 - share + share / kernel_speedup).

    python benchmarks/bench_e2e_sparse.py            # S=8192 (a few minutes)
    python benchmarks/bench_e2e_sparse.py --seq 2048 --repeat 2
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import attnrw


def build(seq: int) -> tuple[torch.nn.Module, dict]:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=max(seq, 2048),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaModel(cfg).eval()
    kwargs = {"input_ids": torch.randint(0, cfg.vocab_size, (1, seq)), "use_cache": False}
    return model, kwargs


def timeit(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _no_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Stands in for SDPA to measure everything but attention (same output shape, no work)."""
    return q.new_zeros(*q.shape[:-1], v.shape[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)

    model, kwargs = build(args.seq)
    options = {"policy": "sparse", "window": args.window, "sinks": args.sinks}

    dense = torch.compile(model)
    t_dense = timeit(lambda: dense(**kwargs), args.repeat)
    reports: list[attnrw.Report] = []
    torch._dynamo.reset()
    sparse = torch.compile(model, backend=attnrw.backend(attnrw.Sparse(window=args.window, sinks=args.sinks),
                                                         on_report=reports.append))
    t_sparse = timeit(lambda: sparse(**kwargs), args.repeat)
    ops = [d.op for r in reports for d in r.decisions]

    # Share of attention in the dense run: time the compiled model without it.
    torch._dynamo.reset()
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _no_attention
    try:
        rest = torch.compile(model)
        t_rest = timeit(lambda: rest(**kwargs), args.repeat)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
    share = max(0.0, 1.0 - t_rest / t_dense)
    keys_dense = (args.seq + 1) / 2  # causal: a query sees on average half the sequence
    keys_sparse = args.window + args.sinks
    kernel_bound = keys_dense / keys_sparse
    amdahl = 1.0 / (1.0 - share + share / kernel_bound)

    print(f"Llama-style decoder, 4 layers, hidden 512, 8 heads / 2 kv heads, S={args.seq}, CPU fp32, "
          f"{torch.get_num_threads()} threads; median of {args.repeat}")
    print(f"attnrw ops: {ops}")
    print("| run | time (s) | speed-up |")
    print("| --- | --- | --- |")
    print(f"| torch.compile (Inductor), dense | {t_dense:.2f} | 1.00× |")
    print(f"| torch.compile(backend=\"attnrw\", sparse W={args.window}, sinks={args.sinks}) | {t_sparse:.2f} "
          f"| {t_dense / t_sparse:.2f}× |")
    print(f"| dense without attention (for the share) | {t_rest:.2f} | - |")
    print(f"attention share of the dense run: {share:.0%}; keys per query dense/sparse: {kernel_bound:.1f}×; "
          f"Amdahl bound on the speed-up: {amdahl:.2f}×")


if __name__ == "__main__":
    main()
