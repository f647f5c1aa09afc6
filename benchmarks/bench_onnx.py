"""onnxruntime (CPU) latency of attnrw's ONNX exports of causal sliding-window attention.

Compares, at the same shapes and window:

* ``dense``: ``attnrw::attention(is_causal=True)`` exported as one standard
  ``Attention`` node (opset 23, onnxruntime's native kernel), the exact baseline;
* ``sparse``: ``attnrw::sparse_attention(window=W)`` exported by attnrw's chunked
  O(S·W) translation (opset 23, standard operators only);
* ``ort-gqa``: onnxruntime's own ``com.microsoft::GroupQueryAttention`` with
  ``local_window_size=W`` (built directly with ``onnx.helper``; it counts the
  query itself among its W keys, the same rule as ``Sparse(window=W)``).

The sparse and GQA outputs are checked to agree before timing. Each timing is
the median of ``--repeat`` rounds after one warm-up; a round runs every
variant once, so load drift on a shared machine hits them alike. Run::

    python benchmarks/bench_onnx.py                       # S = 4096, 8192; W = 256; H = 8; D = 64
    python benchmarks/bench_onnx.py --seq 4096 --chunks 64,128,256,512   # chunk-size sweep
    python benchmarks/bench_onnx.py --write-results       # also record the table in benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attnrw  # noqa: E402
from attnrw.export import to_onnx, translation_table  # noqa: E402
from attnrw.export.api import export_program  # noqa: E402
from attnrw.export.sparse import plan_layout, sparse_translation  # noqa: E402

SECTION = "## ONNX export (onnxruntime CPU)"


class _Dense(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v):
        return torch.ops.attnrw.attention(q, k, v, None, True, self.scale)


class _Sparse(torch.nn.Module):
    def __init__(self, window: int, scale: float) -> None:
        super().__init__()
        self.window, self.scale = window, scale

    def forward(self, q, k, v):
        return torch.ops.attnrw.sparse_attention(q, k, v, None, True, self.scale, self.window, 0, 0, 64, "torch")


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _time_interleaved(runs: dict[str, tuple], repeat: int) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Time each (session, feeds) ``repeat`` times, one round of all of them at a time.

    On a shared machine the load drifts over a run; interleaving lets every
    variant see the same drift, so the ratios hold better than the absolute times.
    """
    outs = {name: sess.run(None, feeds) for name, (sess, feeds) in runs.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, (sess, feeds) in runs.items():
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - t0)
    return times, outs


def _export(module: torch.nn.Module, args: tuple, path: Path, chunk: int | None = None) -> Path:
    """Export with to_onnx (no verification: dense attention at these sizes would dominate the run)."""
    if chunk is None:
        return to_onnx(torch.export.export(module, args), args, path, verify=False, force=True)
    table = translation_table(23)
    table[torch.ops.attnrw.sparse_attention.default] = sparse_translation(23, chunk)
    export_program(torch.export.export(module, args), args, None, 23, table).save(path)
    return path


def _gqa_model(heads: int, kv_heads: int, dim: int, window: int, scale: float, path: Path) -> Path:
    """A one-node graph: com.microsoft::GroupQueryAttention over (B, S, H·D) inputs, no KV cache."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "key", "value", "", "", "seqlens_k", "total_sequence_length"],
        ["output", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=heads,
        kv_num_heads=kv_heads,
        local_window_size=window,
        scale=scale,
    )
    graph = helper.make_graph(
        [node],
        "gqa",
        [
            helper.make_tensor_value_info("query", TensorProto.FLOAT, ["B", "S", heads * dim]),
            helper.make_tensor_value_info("key", TensorProto.FLOAT, ["B", "S", kv_heads * dim]),
            helper.make_tensor_value_info("value", TensorProto.FLOAT, ["B", "S", kv_heads * dim]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", "S", heads * dim])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


def _gqa_feeds(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    b, _, s, _ = q.shape
    flat = lambda t: t.transpose(1, 2).reshape(b, s, -1).contiguous().numpy()  # noqa: E731
    return {
        "query": flat(q),
        "key": flat(k),
        "value": flat(v),
        "seqlens_k": np.full((b,), s - 1, dtype=np.int32),
        "total_sequence_length": np.array(s, dtype=np.int32),
    }


def run(seqs: list[int], window: int, heads: int, dim: int, repeat: int, chunks: list[int] | None) -> list[dict]:
    rows = []
    scale = dim**-0.5
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for s in seqs:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, heads, s, dim, generator=g) for _ in range(3))
            feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
            # The headline is the default layout; a --chunks sweep runs beside it.
            default = plan_layout(window, True).chunk
            runs: dict[str, tuple] = {}
            for chunk in [None, *(c for c in chunks or [] if c != default)]:
                label = str(chunk or default)
                path = _export(_Sparse(window, scale), (q, k, v), tmp / f"sparse{s}_{label}.onnx", chunk)
                runs[f"sparse/{label}"] = (_session(path), feeds)
            runs["ort_gqa"] = (_session(_gqa_model(heads, heads, dim, window, scale, tmp / "gqa.onnx")), _gqa_feeds(q, k, v))
            runs["dense"] = (_session(_export(_Dense(scale), (q, k, v), tmp / f"dense{s}.onnx")), feeds)
            times, outs = _time_interleaved(runs, repeat)

            med = {name: statistics.median(t) for name, t in times.items()}
            best = {name: min(t) for name, t in times.items()}
            sparse_names = [n for n in runs if n.startswith("sparse/")]
            chosen = f"sparse/{default}"
            gqa_bhsd = outs["ort_gqa"][0].reshape(1, s, heads, dim).transpose(0, 2, 1, 3)
            row = {
                "S": s,
                "dense": med["dense"],
                "sparse": med[chosen],
                "ort_gqa": med["ort_gqa"],
                "min_ratio": best["dense"] / best[chosen],
                "sparse_by_chunk": {n.split("/")[1]: med[n] for n in sparse_names},
                "sparse_vs_gqa_max_abs": float(np.abs(gqa_bhsd - outs[chosen][0]).max()),
            }
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def _format_row(r: dict) -> str:
    return (
        f"| {r['S']} | {r['dense'] * 1e3:.0f} | {r['sparse'] * 1e3:.1f} | {r['ort_gqa'] * 1e3:.0f} | "
        f"{r['dense'] / r['sparse']:.1f}× ({r['min_ratio']:.1f}×) | {r['ort_gqa'] / r['sparse']:.1f}× | "
        f"{r['sparse_vs_gqa_max_abs']:.1e} |"
    )


HEADER = (
    "| S | dense Attention-23 (ms) | attnrw sparse (ms) | ORT GQA local_window (ms) | dense / sparse (of minima) "
    "| GQA / sparse | max abs(sparse − GQA) |\n"
    "| --- | --- | --- | --- | --- | --- | --- |"
)


def _write_results(rows: list[dict], command: str, args: argparse.Namespace) -> Path:
    import onnxruntime

    path = ROOT / "benchmarks" / "RESULTS.md"
    chunk_lines = "\n".join(
        f"- S={r['S']}: " + ", ".join(f"chunk {c}: {t * 1e3:.1f} ms" for c, t in r["sparse_by_chunk"].items())
        for r in rows
    )
    section = "\n".join(
        [
            SECTION,
            "",
            f"Date: {_dt.date.today().isoformat()}. Command: `{command}`",
            "",
            f"B=1, H={args.heads}, D={args.dim}, fp32, causal window W={args.window}, no sinks; "
            f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, {os.cpu_count()} CPU cores "
            f"(shared with other jobs: absolute times drift); median of {args.repeat} interleaved rounds after a warm-up, "
            "the ratio of the fastest runs in parentheses.",
            "dense: `attnrw::attention` exported as one `Attention` node (opset 23, native kernel; exact).",
            "attnrw sparse: `attnrw::sparse_attention(window=W)` exported by attnrw (opset 23: chunks of the sequence "
            "as the batch of one standard `Attention` node; O(S·W)), default chunk size.",
            "ORT GQA: `com.microsoft::GroupQueryAttention(local_window_size=W)`, the same keys per query.",
            "",
            HEADER,
            *(_format_row(r) for r in rows),
            "",
            "Sparse by chunk size:",
            chunk_lines,
            "",
        ]
    )
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[nxt + 1 :] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", default="4096,8192", help="comma-separated sequence lengths")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--chunks", default=None, help="comma-separated sparse chunk sizes to sweep (default: the layout's)")
    p.add_argument("--write-results", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    seqs = [int(x) for x in args.seq.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")] if args.chunks else None
    print(HEADER)
    rows = run(seqs, args.window, args.heads, args.dim, args.repeat, chunks)
    for r in rows:
        if len(r["sparse_by_chunk"]) > 1:
            print(f"S={r['S']} sparse by chunk:", {c: f"{t * 1e3:.1f} ms" for c, t in r["sparse_by_chunk"].items()})
    if args.write_results:
        command = "python benchmarks/bench_onnx.py " + " ".join(argv if argv is not None else sys.argv[1:])
        print("wrote", _write_results(rows, command.strip(), args))


if __name__ == "__main__":
    main()
