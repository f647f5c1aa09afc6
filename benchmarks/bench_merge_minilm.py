"""Merge (token merging) on the pretrained all-MiniLM-L6-v2: speed-up and embedding cosine per setting.

Real English texts (standard-library docstrings joined into passages of
128..512 tokens, benchmarks/corpus.py) are padded to a few fixed bucket
lengths (each text to the smallest bucket that holds it) and run in batches
with their ``attention_mask``, so every compiled model sees a few static
shapes (``dynamic=False``). The reference is the unmodified model compiled
by ``torch.compile`` (Inductor); its sentence embeddings (mean pooling +
L2 normalisation, as sentence-transformers does) are the reference
embeddings. Each setting is the same model compiled with
``backend="attnrw"`` and a Merge policy.

Timing: every bucket shape is compiled first (warm-up); then each batch is
run on the reference and right after on the setting, over all batches,
``--repeat`` times; per batch the *minimum* time of each is kept (a shared
machine only adds time) and these are summed over the batches ("s/pass").
Speed-up = reference time / setting time, the two measured interleaved so
machine drift cancels ("speed-up by bucket": the same per bucket length;
merging gains more on longer texts). "vs attnrw dense" divides it by the speed-up of
the exact Dense rewrite (the first sanity row), so it shows what merging
gains over plain fused attention. Quality: per-text cosine similarity of the
setting's embedding (from its first timed run) to the reference one; filler
rows that complete a bucket's last batch are timed but not scored.

    python benchmarks/bench_merge_minilm.py                   # 200 texts, 20 settings; roughly 35 min on 2 idle cores
    python benchmarks/bench_merge_minilm.py --quick           # 16 texts, one bucket; a few minutes
    python benchmarks/bench_merge_minilm.py --modes tokens --ratios 0.1,0.3 \\
        --schedules "0,0,0.3,0.3,0.3,0.3;encoder.layer.4.*=0.5,encoder.layer.5.*=0.5" --json merge.json
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shlex
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnrw  # noqa: E402
from corpus import embed, minilm, texts  # noqa: E402

MODES = ("kv", "qkv", "tokens")

# ---------------------------------------------------------------------------
# The settings. Edit these lists to change what the default run measures.
# A ratio spec is what Merge(ratio=...) takes: a float (every site), a list
# (one value per attention site in graph order; MiniLM has 6), or a dict of
# module-path globs (sites are "encoder.layer.<i>.attention.self"; a site no
# glob matches gets ratio 0). In "tokens" mode ratios compound through the
# layers (each site merges a fraction of the tokens left by the ones before).
# ---------------------------------------------------------------------------

#: "Constant-ratio ToMe" family: the same ratio at every site. (0.05 because
#: in tokens mode six sites at r keep only (1 - r)^6 of the tokens.)
CONSTANT_RATIOS: list[float] = [0.05, 0.1, 0.2]

#: "Scheduled" family: merge only at later layers (sites 2..5 or 3..5 of 0..5). (label, ratio spec).
SCHEDULES: list[tuple[str, Any]] = [
    ("late4@0.15", [0, 0, 0.15, 0.15, 0.15, 0.15]),
    ("late4@0.25", {"encoder.layer.[2-5].*": 0.25}),  # the same kind of schedule as module-path globs
    ("late3@0.3", [0, 0, 0, 0.3, 0.3, 0.3]),
]

#: Sanity rows run first: the exact Dense rewrite, and Merge merging nothing.
#: Both should give cosine 1.0 (to rounding) against the reference.
SANITY: list[tuple[str, dict[str, Any]]] = [
    ("attnrw dense", {"policy": "dense"}),
    ("merge ratio 0", {"policy": "merge", "ratio": 0.0, "mode": "kv"}),
]

#: Quick run (--quick): fewer settings.
QUICK_CONSTANT: list[float] = [0.2]
QUICK_SCHEDULES: list[tuple[str, Any]] = [("late4@0.3", {"encoder.layer.[2-5].*": 0.3})]

#: The target checked at the end: speed-up >= TARGET_SPEEDUP at mean cosine >= TARGET_COS in TARGET_MODE.
TARGET_MODE, TARGET_SPEEDUP, TARGET_COS = "tokens", 1.5, 0.98


@dataclass
class Setting:
    label: str
    family: str  # "sanity", "constant" or "scheduled"
    mode: str  # the requested Merge mode, or "-" for a non-merge policy
    options: dict[str, Any]  # torch.compile options (without on_report)

    @property
    def spec(self) -> Any:
        return self.options.get("ratio")


@dataclass
class Batch:
    kwargs: dict[str, torch.Tensor]
    real: int  # rows 0..real-1 are distinct texts; the rest fill the batch and are not scored
    bucket: int


@dataclass
class Result:
    setting: Setting
    time_s: float = math.nan
    ref_time_s: float = math.nan
    cos: list[float] = field(default_factory=list)
    sites: dict[str, tuple[str, str]] = field(default_factory=dict)  # module path -> (what ran, note)
    bucket_s: dict[int, tuple[float, float]] = field(default_factory=dict)  # bucket -> (reference, setting) s
    compile_s: float = math.nan
    error: str = ""

    @property
    def speedup(self) -> float:
        return self.ref_time_s / self.time_s

    @property
    def mean_cos(self) -> float:
        return sum(self.cos) / len(self.cos) if self.cos else math.nan

    def pct_cos(self, p: float) -> float:
        return percentile(self.cos, p)

    def site_summary(self) -> str:
        if not self.sites:
            return "no report"
        counts = Counter(what for what, _ in self.sites.values())
        return ", ".join(f"{n}×{what}" for what, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.setting.label,
            "family": self.setting.family,
            "mode": self.setting.mode,
            "options": self.setting.options,
            "time_s": self.time_s,
            "ref_time_s": self.ref_time_s,
            "speedup": None if self.error else self.speedup,
            "mean_cos": None if self.error else self.mean_cos,
            "p5_cos": None if self.error else self.pct_cos(5),
            "min_cos": min(self.cos) if self.cos else None,
            "compile_s": self.compile_s,
            "per_bucket": {str(b): {"ref_time_s": a, "time_s": t, "speedup": a / t}
                           for b, (a, t) in sorted(self.bucket_s.items())},
            "sites": {path: {"ran": what, "note": note} for path, (what, note) in self.sites.items()},
            "site_summary": self.site_summary(),
            "error": self.error or None,
        }


def percentile(xs: list[float], p: float) -> float:
    """The ``p``-th percentile, linear between order statistics (numpy's default)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def site_ratio(spec: Any, path: str, index: int) -> float:
    """One site's ratio under a Merge ratio spec (float, per-site list, or dict of globs; unmatched -> 0)."""
    if isinstance(spec, (list, tuple)):
        return float(spec[index]) if index < len(spec) else math.nan
    if isinstance(spec, dict):
        return next((float(v) for g, v in spec.items() if fnmatch.fnmatchcase(path, g)), 0.0)
    return float(spec)


def what_ran(decision: Any, setting: Setting, ratio: float) -> str:
    """What one site ran, from the attnrw report: "tokens", "qkv", "kv", "...@0" (ratio 0), "attention", ...

    A site carried in tokens mode is reported with op ``tokens_attention``; a
    ``merged_attention`` site ran ``kv`` or ``qkv`` (a tokens-mode site that
    was not carried merged and restored at the site, i.e. ran as ``qkv``), and
    a fallback names the mode it ran in its note ("... as qkv", "... (kv)").
    """
    op = decision.op
    if op is None:
        return "as written"
    if "tokens" in op:
        mode = "tokens"
    elif "merge" not in op:
        return op  # e.g. "attention": the dense rewrite
    else:
        said = re.findall(r"(?:\bas |\()(kv|qkv|tokens)\b", decision.note or "")
        mode = said[-1] if said else setting.mode
        if mode == "tokens":
            mode = "qkv"
    return f"{mode}@0" if ratio == 0 else mode


def make_batches(tok: Any, passages: list[str], buckets: list[int], batch: int) -> list[Batch]:
    """Each passage to the smallest bucket length that holds it; batches of ``batch`` rows per bucket.

    A bucket's last batch is completed with repeats of the bucket's first texts
    (``Batch.real`` counts the distinct ones), so every batch has the same shape.
    """
    by_bucket: dict[int, list[str]] = {b: [] for b in buckets}
    for p in passages:
        n = len(tok(p)["input_ids"])  # with [CLS] and [SEP]
        fit = [b for b in buckets if b >= n]
        if not fit:
            raise ValueError(f"a text of {n} tokens does not fit the largest bucket {max(buckets)}")
        by_bucket[min(fit)].append(p)
    out = []
    for b in buckets:
        ps = by_bucket[b]
        for i in range(0, len(ps), batch):
            chunk = ps[i : i + batch]
            real = len(chunk)
            chunk = chunk + [ps[j % len(ps)] for j in range(batch - real)]
            enc = tok(chunk, padding="max_length", truncation=True, max_length=b, return_tensors="pt")
            out.append(Batch({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, real, b))
    return out


def warm_up(fn: Any, data: list[Batch]) -> float:
    """Call ``fn`` once on one batch of every bucket (compiles each shape); seconds taken."""
    t0 = time.perf_counter()
    seen = set()
    for bt in data:
        if bt.bucket not in seen:
            seen.add(bt.bucket)
            fn(**bt.kwargs)
    return time.perf_counter() - t0


def one_pass(fn: Any, data: list[Batch]) -> float:
    t0 = time.perf_counter()
    for bt in data:
        fn(**bt.kwargs)
    return time.perf_counter() - t0


def interleaved(fn_a: Any, fn_b: Any, data: list[Batch], repeat: int
                ) -> tuple[list[float], list[float], list[torch.Tensor]]:
    """Per batch, the min of ``repeat`` run times of ``fn_a`` and of ``fn_b``; and ``fn_b``'s
    embeddings (from its first run; pooling is outside the timed call).

    Each batch runs on ``a`` then right after on ``b``, so both see the same
    load on a shared machine; the minimum drops runs that another process slowed.
    """
    best_a = [math.inf] * len(data)
    best_b = [math.inf] * len(data)
    embs = []
    for rnd in range(repeat):
        for i, bt in enumerate(data):
            t0 = time.perf_counter()
            fn_a(**bt.kwargs)
            t1 = time.perf_counter()
            out = fn_b(**bt.kwargs)
            t2 = time.perf_counter()
            best_a[i] = min(best_a[i], t1 - t0)
            best_b[i] = min(best_b[i], t2 - t1)
            if rnd == 0:
                embs.append(embed(out.last_hidden_state.float(), bt.kwargs["attention_mask"])[: bt.real])
    return best_a, best_b, embs


def embeddings(fn: Any, data: list[Batch]) -> list[torch.Tensor]:
    """Per batch, the embeddings of its real rows."""
    out = []
    for bt in data:
        h = fn(**bt.kwargs).last_hidden_state
        out.append(embed(h.float(), bt.kwargs["attention_mask"])[: bt.real])
    return out


def cosines(embs: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    # Both sides are unit vectors; the clamp keeps rounding from passing 1.
    return [float(c) for e, r in zip(embs, ref) for c in (e * r).sum(-1).clamp(-1.0, 1.0)]


def parse_schedule(text: str) -> tuple[str, Any]:
    """``"0,0,0.3,0.3,0.3,0.3"`` (per-site list) or ``"encoder.layer.4.*=0.5,encoder.layer.5.*=0.5"`` (dict)."""
    text = text.strip()
    if "=" in text:
        spec = {}
        for part in text.split(","):
            glob, _, value = part.partition("=")
            spec[glob.strip()] = float(value)
        return "{" + ",".join(f"{g}={v:g}" for g, v in spec.items()) + "}", spec
    values = [float(x) for x in text.split(",")]
    return "[" + ",".join(f"{v:g}" for v in values) + "]", values


def build_settings(modes: list[str], ratios: list[float], schedules: list[tuple[str, Any]],
                   sanity: bool) -> list[Setting]:
    out = [Setting(label, "sanity", opts.get("mode", "-"), dict(opts)) for label, opts in SANITY] if sanity else []
    for mode in modes:
        for r in ratios:
            out.append(Setting(f"const {r:g}", "constant", mode, {"policy": "merge", "ratio": r, "mode": mode}))
        for label, spec in schedules:
            out.append(Setting(label, "scheduled", mode, {"policy": "merge", "ratio": spec, "mode": mode}))
    for st in out:  # a bad ratio or schedule fails here, before anything is compiled
        attnrw.policy_from_dict(st.options)
    return out


def run_setting(model: Any, st: Setting, data: list[Batch], ref_fn: Any, ref_embs: list[torch.Tensor],
                repeat: int) -> Result:
    res = Result(st)
    reports: list[Any] = []
    fn = torch.compile(model, backend="attnrw", dynamic=False, options={**st.options, "on_report": reports.append})
    try:
        res.compile_s = warm_up(fn, data)
        t_ref, t_set, embs = interleaved(ref_fn, fn, data, max(repeat, 1))
        res.ref_time_s, res.time_s = sum(t_ref), sum(t_set)
        for bt, a, b in zip(data, t_ref, t_set):
            ra, rb = res.bucket_s.get(bt.bucket, (0.0, 0.0))
            res.bucket_s[bt.bucket] = (ra + a, rb + b)
        res.cos = cosines(embs, ref_embs)
    except Exception as e:  # one setting failing (e.g. a mode mid-implementation) must not stop the table
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    # One report per compiled graph (one per bucket shape); show the largest bucket's.
    if reports:
        rep = max(reports, key=lambda r: max((site.kv_len for site in r.sites), default=0))
        for i, d in enumerate(rep.decisions):
            ratio = site_ratio(st.spec, d.module_path, i) if st.spec is not None else math.nan
            res.sites[d.module_path] = (what_ran(d, st, ratio), d.note)
    return res


def note_rows(res: Result, seen: set[str]) -> list[str]:
    """Sub-rows for the report notes: the token count per site when the notes give it (tokens mode),
    and each kind of note once per run (numbers blanked to tell kinds apart)."""
    rows = []
    notes = [note for _, note in res.sites.values() if note]
    counts = [re.search(r"attention on (\d+) of (\d+)", n) for n in notes]
    if counts and all(counts):
        chain = "→".join([counts[0].group(2)] + [c.group(1) for c in counts])
        rows.append(f"|   ↳ tokens per site (largest bucket): {chain} | | | | | | | | |")
    for note in notes:
        kind = re.sub(r"\d+", "#", note)
        if kind not in seen:
            seen.add(kind)
            rows.append(f"|   ↳ report note: {note} | | | | | | | | |")
    return rows


def row(res: Result, dense: Result | None) -> str:
    st = res.setting
    if res.error:
        return f"| {st.label} | {st.mode} | error | - | - | - | - | - | {res.error} |"
    vs_dense = f"{res.speedup / dense.speedup:.2f}×" if dense is not None and not dense.error else "-"
    by_bucket = " ".join(f"{b}:{a / t:.2f}" for b, (a, t) in sorted(res.bucket_s.items()))
    return (f"| {st.label} | {st.mode} | {res.speedup:.2f}× | {vs_dense} | {by_bucket} | {res.time_s:.2f} | "
            f"{res.mean_cos:.4f} | {res.pct_cos(5):.4f} | {res.site_summary()} |")


def summarize(results: list[Result], modes: list[str]) -> dict[str, Any]:
    """Per mode: scheduled settings that dominate constant ones; and whether the target is met."""
    ok = [r for r in results if not r.error]
    summary: dict[str, Any] = {"dominance": {}, "target": {}}
    print("\nScheduled settings that dominate constant-ratio ones (higher speed-up AND higher mean cosine):")
    for mode in modes:
        const = [r for r in ok if r.setting.mode == mode and r.setting.family == "constant"]
        sched = [r for r in ok if r.setting.mode == mode and r.setting.family == "scheduled"]
        dom: dict[str, list[str]] = {}
        for s in sched:
            beaten = [c.setting.label for c in const if s.speedup > c.speedup and s.mean_cos > c.mean_cos]
            dom[s.setting.label] = beaten
            text = ", ".join(beaten) if beaten else "none"
            print(f"  {mode:6s} {s.setting.label:>20s} ({s.speedup:.2f}×, cos {s.mean_cos:.4f}) dominates: {text}")
        if not sched:
            print(f"  {mode:6s} (no scheduled settings ran)")
        summary["dominance"][mode] = dom

    goal = f"≥ {TARGET_SPEEDUP}× speed-up at mean cosine ≥ {TARGET_COS} in {TARGET_MODE} mode"
    cands = [r for r in ok if r.setting.mode == TARGET_MODE]
    met = [r for r in cands if r.speedup >= TARGET_SPEEDUP and r.mean_cos >= TARGET_COS]
    print(f"\nTarget {goal}: ", end="")
    if not cands:
        print("not measured (no setting in that mode ran)")
    elif met:
        print("MET by " + ", ".join(f"{r.setting.label} ({r.speedup:.2f}×, cos {r.mean_cos:.4f})" for r in met))
    else:
        within = [r for r in cands if r.mean_cos >= TARGET_COS]
        best = max(within, key=lambda r: r.speedup) if within else None
        print("NOT met; " + (f"best speed-up at cos ≥ {TARGET_COS}: {best.setting.label} ({best.speedup:.2f}×, "
                              f"cos {best.mean_cos:.4f})" if best else f"no {TARGET_MODE} setting reaches cos {TARGET_COS}"))
    not_carried = [r.setting.label for r in cands if r.sites and any(
        not what.startswith("tokens") for what, _ in r.sites.values() if "@0" not in what)]
    if not_carried:
        print(f"  note: in {', '.join(not_carried)} some merging sites did not run in {TARGET_MODE} mode "
              "(see the sites column and the report notes above)")
    summary["target"] = {"goal": goal, "met_by": [r.setting.label for r in met], "measured": bool(cands),
                         "sites_not_in_mode": not_carried}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 texts of 128-254 tokens, one bucket (256), few settings")
    ap.add_argument("--texts", type=int, default=None, help="number of texts (default 200; quick 16)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--buckets", default=None, help="bucket lengths, comma-separated (default 192,256,384,512)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each batch per setting; the minimum is kept")
    ap.add_argument("--modes", default=",".join(MODES), help="Merge modes, comma-separated (kv,qkv,tokens)")
    ap.add_argument("--ratios", default=None, help="constant-ratio family, comma-separated (default "
                    f"{','.join(map(str, CONSTANT_RATIOS))}; quick {','.join(map(str, QUICK_CONSTANT))})")
    ap.add_argument("--schedules", default=None,
                    help='scheduled family, ";"-separated; each a per-site list "0,0,0.3,0.3,0.3,0.3" '
                         'or globs "encoder.layer.4.*=0.5,encoder.layer.5.*=0.5" (default: SCHEDULES in the file)')
    ap.add_argument("--no-sanity", action="store_true", help="skip the attnrw-dense and ratio-0 rows")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = ap.parse_args()

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if args.ratios is not None:
        ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    else:
        ratios = QUICK_CONSTANT if args.quick else CONSTANT_RATIOS
    if args.schedules is not None:
        schedules = [parse_schedule(s) for s in args.schedules.split(";") if s.strip()]
    else:
        schedules = QUICK_SCHEDULES if args.quick else SCHEDULES
    n_texts = args.texts or (16 if args.quick else 200)
    max_tokens = 254 if args.quick else 512
    buckets = sorted(int(b) for b in (args.buckets or ("256" if args.quick else "192,256,384,512")).split(","))

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Every setting adds cache entries on the same forward (one per bucket); keep them all, so the
    # reference stays compiled and is timed beside each setting.
    torch._dynamo.config.recompile_limit = 100_000
    torch._dynamo.config.accumulated_recompile_limit = 100_000

    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; CPU {torch.get_num_threads()} "
          f"threads (os.cpu_count() = {os.cpu_count()})")

    model, tok = minilm()
    passages = texts(tok, n_texts, min_tokens=128, max_tokens=max_tokens)
    data = make_batches(tok, passages, buckets, args.batch)
    per_bucket = Counter(bt.bucket for bt in data)
    lens = [len(tok(p)["input_ids"]) for p in passages]
    print(f"all-MiniLM-L6-v2 (pretrained), {len(passages)} stdlib texts of {min(lens)}..{max(lens)} tokens "
          f"(mean {sum(lens) / len(lens):.0f}); batches of {args.batch}, "
          + ", ".join(f"{per_bucket[b]}×{b}" for b in buckets if per_bucket[b])
          + f" tokens ({sum(args.batch - bt.real for bt in data)} filler rows, not scored); attention_mask given")

    results: list[Result] = []
    header: dict[str, Any] = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "texts": len(passages), "batch": args.batch,
                              "buckets": {str(b): per_bucket[b] for b in buckets}, "repeat": args.repeat,
                              "timing": "sum over batches of the min over repeat runs; reference and setting interleaved batch by batch"}

    def write_json(summary: dict[str, Any] | None = None) -> None:
        if args.json:
            out = {**header, "results": [r.to_dict() for r in results], **(summary or {})}
            Path(args.json).write_text(json.dumps(out, indent=2, default=str))

    with torch.no_grad():
        ref_fn = torch.compile(model, dynamic=False)
        t_compile = warm_up(ref_fn, data)
        ref_embs = embeddings(ref_fn, data)
        eager_cos = cosines(embeddings(model, data), ref_embs)
        t_base = sum(min(one_pass(ref_fn, [bt]) for _ in range(args.repeat)) for bt in data)
        header.update(baseline_s=t_base, baseline_compile_s=t_compile, eager_vs_inductor_min_cos=min(eager_cos))
        print(f"reference: torch.compile (Inductor), {t_compile:.0f} s to compile {len(per_bucket)} shape(s); "
              f"{t_base:.2f} s over all batches (per batch min of {args.repeat}); eager vs compiled cosine "
              f"min {min(eager_cos):.6f}")
        print(f"speed-up = reference time / setting time over all batches (per batch the min of {args.repeat} runs, "
              "reference and setting interleaved batch by batch); cosine per text against the reference embedding\n")
        print("| setting | mode | speed-up | vs attnrw dense | speed-up by bucket | s/pass | mean cos | p5 cos | "
              "sites (what ran, largest bucket, from the attnrw report) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
        notes_seen: set[str] = set()
        for st in build_settings(modes, ratios, schedules, sanity=not args.no_sanity):
            res = run_setting(model, st, data, ref_fn, ref_embs, args.repeat)
            results.append(res)
            dense = next((r for r in results if r.setting.options.get("policy") == "dense"), None)
            print(row(res, dense), flush=True)
            for line in note_rows(res, notes_seen):
                print(line, flush=True)
            write_json()
    summary = summarize(results, modes)
    write_json(summary)
    if args.json:
        print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
