"""Offline rewrite: attnrw.rewrite -> torch.export.save -> torch.export.load -> run.

Run: python examples/offline_rewrite.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import attnrw  # registers torch.ops.attnrw.*, which the saved program calls
from tiny_model import build


def main() -> None:
    model, args = build(seq=64)
    report = attnrw.inspect(model, args)
    print(report.summary())

    with torch.no_grad():
        reference = model(*args)
    for policy in (attnrw.Dense(), attnrw.Sparse(window=16, sinks=4)):
        program = attnrw.rewrite(model, args, policy=policy)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tiny.attnrw.pt2"
            torch.export.save(program, path)
            loaded = torch.export.load(path)
        with torch.no_grad():
            out = loaded.module()(*args)
        diff = (out - reference).abs().max().item()
        rel = ((out - reference).norm() / reference.norm()).item()
        print(f"{policy.name:<7} saved and reloaded: max abs diff {diff:.2e}, relative L2 {rel:.3f}")


if __name__ == "__main__":
    main()
