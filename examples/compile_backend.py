"""torch.compile(model, backend="attnrw"): rewrite the attention of an unmodified model.

Run: python examples/compile_backend.py
"""

from __future__ import annotations

import torch

from tiny_model import build


def main() -> None:
    model, (ids,) = build(seq=64)
    with torch.no_grad():
        reference = model(ids)

        # Exact: each attention site becomes one fused attention call. No import of attnrw is
        # needed for the name "attnrw": the backend is registered through an entry point.
        dense = torch.compile(model, backend="attnrw")
        diff = (dense(ids) - reference).abs().max().item()
        print(f"dense (exact):                max abs diff {diff:.2e}")

        # Approximate: a sliding window of 16 keys plus 4 sink tokens, from torch.compile options.
        sparse = torch.compile(model, backend="attnrw", options={"policy": "sparse", "window": 16, "sinks": 4})
        out = sparse(ids)
        rel = ((out - reference).norm() / reference.norm()).item()
        print(f"sparse (window 16 + 4 sinks): relative L2 error {rel:.3f}")


if __name__ == "__main__":
    main()
