"""The torch-free ``attnrw`` launcher (:mod:`attnrw_cli`): what it answers alone, and that it agrees with attnrw.

Each command line runs in a fresh interpreter, as the console script runs
it; the wall time of each is printed (``pytest -s`` shows it; it is not
asserted: ``benchmarks/bench_cli_help.py`` measures it).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnrw import cli, cli_flags

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "attnrw_cli"

#: Runs the launcher on argv (JSON in argv[1]) and reports its exit code and whether torch was imported.
_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import attnrw_cli
code = attnrw_cli.main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "seconds": time.perf_counter() - t0}))
"""


_TIMES: list[str] = []


@pytest.fixture(autouse=True)
def _print_times(capsys: pytest.CaptureFixture[str]):
    """Print the wall time of each launch once the test is done (after it has read its own output)."""
    _TIMES.clear()
    yield
    with capsys.disabled():
        for line in _TIMES:
            print(f"\n{line}", end="")


def launch(*argv: str) -> tuple[dict, str, str]:
    """``attnrw ARGV`` through the launcher in a fresh interpreter: (probe report, stdout before it, stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(argv))], cwd=ROOT, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    wall = time.perf_counter() - t0
    lines = proc.stdout.rstrip("\n").splitlines()
    assert proc.returncode == 0 and lines, proc.stderr
    report = json.loads(lines[-1])
    _TIMES.append(f"attnrw {' '.join(argv)}: {wall:.2f} s wall in a fresh interpreter (exit {report['code']})")
    return report, "\n".join(lines[:-1]), proc.stderr


def test_snapshot_matches_the_policy_registry() -> None:
    """``attnrw_cli/builtin_policies.py`` is what ``python -m attnrw.cli_flags`` would write now."""
    assert (LAUNCHER / "builtin_policies.py").read_text() == cli_flags.spec_module_text(), (
        "the built-in policies changed: regenerate the launcher's snapshot with python -m attnrw.cli_flags"
    )


@pytest.mark.parametrize("argv", [["--help"], ["rewrite", "--help"], ["export", "--help"], ["bench", "--help"],
                                  ["--version"]])
def test_help_without_torch(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Help and version are answered without importing torch, and say what attnrw.cli.main says."""
    report, out, err = launch(*argv)
    assert report == {**report, "code": 0, "torch": False}, err
    assert cli.main(argv) == 0
    assert out == capsys.readouterr().out.rstrip("\n")


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "COMMAND"),
        (["rewrite", "m.pt2"], "-o/--output"),
        (["rewrite", "m.pt2", "-o", "x.pt2", "--policy", "nosuch"], "unknown policy 'nosuch'"),
        (["rewrite", "m.pt2", "-o", "x.pt2", "--window", "8"], "--window goes with --policy sparse"),
        (["rewrite", "m.pt2", "-o", "x.pt2", "--policy", "sparse"], "--policy sparse needs --window"),
        (["rewrite", "m.pt2", "-o", "x.pt2", "--policy", "sparse", "--window", "x"],
         "--window: expected an int, got 'x'"),
        (["bench", "m.pt2", "--policy", "auto", "--budget", "x"], "--budget: expected a number, got 'x'"),
        (["rewrite", "m.pt2", "-o", "x.pt2", "--policy", "condense", "--recent", "8"], "needs --group"),
        (["rewrite", "m.pt2", "-o", "x.pt2", "--plan", "p.json", "--policy", "sparse"], "--plan fixes"),
        (["rewrite", "m.pt2", "-o", "x.pt2", "--dynamic-seq", "--static-shapes"], "contradict"),
        (["bench", "m.pt2", "--repeat", "0"], "--repeat must be at least 1"),
        (["inspect", "hf:x", "--seq-len", "0"], "--seq-len must be at least 1"),
    ],
)
def test_command_line_errors_without_torch(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An error the command line shows by itself: one line, exit 2, no torch; attnrw.cli.main says the same."""
    report, out, err = launch(*argv)
    assert report["code"] == 2 and not report["torch"], err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == err


def test_output_path_errors_without_torch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An output that exists (no --force), a missing folder, a folder as the file: answered before torch."""
    existing = tmp_path / "m.pt2"
    existing.write_text("")
    cases = [
        (["rewrite", "m.pt2", "-o", str(existing)], "--force"),
        (["export", "m.pt2", "-o", str(tmp_path / "no" / "m.onnx")], "does not exist"),
        (["bench", "m.pt2", "--plot", str(tmp_path)], "is a folder"),
    ]
    for argv, needle in cases:
        report, _, err = launch(*argv)
        assert report["code"] == 2 and not report["torch"], err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == err


def test_a_valid_command_line_reaches_attnrw() -> None:
    """What needs the model goes on to attnrw.cli (torch imported), with the same one-line error contract."""
    report, _, err = launch("inspect", "no_such_file.pt2")
    assert report["code"] == 2 and report["torch"]
    assert "no such .pt2 file: 'no_such_file.pt2'" in err and len(err.strip().splitlines()) == 1, err


def test_console_script_is_the_launcher() -> None:
    """``pyproject.toml`` points the ``attnrw`` script at the launcher, not at attnrw.cli (which imports torch)."""
    text = (ROOT / "pyproject.toml").read_text()
    assert 'attnrw = "attnrw_cli:main"' in text


def test_version_is_the_package_version() -> None:
    import attnrw
    import attnrw_cli

    assert attnrw_cli.version() == attnrw.__version__


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, at module level)`` for each import in ``path`` (absolute imports only)."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.module, id(node) in top))
    return out


@pytest.mark.parametrize("path", sorted(LAUNCHER.glob("*.py")), ids=lambda p: p.name)
def test_launcher_imports_only_the_standard_library(path: Path) -> None:
    """attnrw_cli imports the standard library and itself; attnrw only inside ``main``, after the checks."""
    for module, top_level in _imports(path):
        root = module.split(".")[0]
        if root == "attnrw" and not top_level and path.name == "__init__.py":
            continue
        assert root in sys.stdlib_module_names or root == "attnrw_cli", f"{path.name} imports {module}"
