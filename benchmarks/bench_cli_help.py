"""Wall time of the ``attnrw`` commands that need no model: help, version and argument errors.

Each command runs in a fresh interpreter (as a user types it), ``--repeat`` times;
the median is printed beside ``python -c "import torch"``, what any command that
imports attnrw pays first. The launcher (``attnrw_cli``) answers help, version
and every command-line error without torch; the last case needs the model and
goes on to attnrw. The target (issue 16) is <= 1 s. Nothing is asserted:
timings on a shared machine are noise.

    python benchmarks/bench_cli_help.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("attnrw")
    return [str(script)] if script.exists() else [sys.executable, "-m", "attnrw_cli"]


CASES = {
    "attnrw --help": ["--help"],
    "attnrw --version": ["--version"],
    "attnrw rewrite --help": ["rewrite", "--help"],
    "attnrw rewrite MODEL (no -o)": ["rewrite", "nosuch_pkg:fn"],
    "attnrw rewrite --policy sparse (no --window)": ["rewrite", "nosuch_pkg:fn", "-o", "x.pt2", "--policy", "sparse"],
    "attnrw rewrite --window 8 (not a dense flag)": ["rewrite", "nosuch_pkg:fn", "-o", "x.pt2", "--window", "8"],
    "attnrw rewrite -o README.md (exists, no --force)": ["rewrite", "nosuch_pkg:fn", "-o", "README.md"],
    "attnrw inspect nosuch_pkg:fn (needs attnrw: imports torch)": ["inspect", "nosuch_pkg:fn"],
}


def _time(argv: list[str], repeat: int) -> tuple[float, int]:
    times, code = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        code = subprocess.run(argv, cwd=ROOT, capture_output=True, stdin=subprocess.DEVNULL, timeout=300).returncode
        times.append(time.perf_counter() - t0)
    return statistics.median(times), code


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    ns = p.parse_args()
    rows = [("python -c 'import torch' (floor)", *_time([sys.executable, "-c", "import torch"], ns.repeat))]
    rows += [(name, *_time(_cli() + argv, ns.repeat)) for name, argv in CASES.items()]
    width = max(len(r[0]) for r in rows)
    print(f"{'command':<{width}}  median s  exit  (target <= 1 s; {ns.repeat} runs each)")
    for name, t, code in rows:
        print(f"{name:<{width}}  {t:8.2f}  {code:4d}")
    if shutil.which("nproc"):
        print(f"({subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} CPU cores)")


if __name__ == "__main__":
    main()
