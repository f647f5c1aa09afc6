"""Tests of the ``attnrw`` command: argument handling, MODEL forms, errors, atomic output.

Most tests call :func:`attnrw.cli.main` in-process; one runs the installed
console script in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnrw
from attnrw import cli
from attnrw.metrics import float_leaves, relative_l2
from attnrw.errors import ModelSpecError
from attnrw.files import write_atomically
from attnrw.shapes import dynamic_seq_shapes
from tests.zoo import ZOO, outputs_to_tensors


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    """Exit status 2 and one line on stderr that holds every needle."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def factory_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder (the current directory) holding a module ``clifactories`` of good and bad factories."""
    (tmp_path / "clifactories.py").write_text(
        textwrap.dedent(
            """
            import torch

            def good():
                return torch.nn.Linear(4, 4), (torch.randn(2, 4),)

            def not_a_tuple():
                return torch.nn.Linear(4, 4)

            def not_a_model():
                return "model", (torch.randn(2, 4),)

            def raises():
                raise RuntimeError("boom")

            class FixedLength(torch.nn.Module):
                def forward(self, x):
                    return x.reshape(2, 8 * 4)

            def fixed_length():
                return FixedLength(), (torch.randn(2, 8, 4),)

            def marks():
                open("loaded.marker", "w").close()
                return good()
            """
        )
    )
    (tmp_path / "clibroken.py").write_text("import no_such_module_attnrw_test\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- argument handling and errors -------------------------------------------------------


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys)
    assert_usage_error(code, err, "COMMAND", "see attnrw --help")


def test_help_and_version_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "--help")[0] == 0
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and "attnrw" in out


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("nonsense", "cannot use MODEL"),
        ("pkg.mod:fn:extra", "cannot use MODEL"),
        ("missing_file.pt2", "no such .pt2 file"),
        ("no_such_pkg_attnrw.mod:fn", "cannot import 'no_such_pkg_attnrw.mod'"),
        ("hf:/no/such/folder", "no such Hugging Face model folder"),
    ],
)
def test_bad_model_spec(capsys: pytest.CaptureFixture[str], spec: str, needle: str) -> None:
    assert_usage_error(*run_cli(capsys, "inspect", spec)[::2], needle)


def test_folder_without_hf_prefix_gets_a_hint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert_usage_error(*run_cli(capsys, "inspect", str(tmp_path))[::2], f"hf:{tmp_path}")


@pytest.mark.parametrize(
    "fn, needle",
    [
        ("missing", "has no callable 'missing'"),
        ("not_a_tuple", "must return (model, args)"),
        ("not_a_model", "expected an nn.Module"),
        ("raises", "raised RuntimeError: boom"),
    ],
)
def test_bad_factory(capsys: pytest.CaptureFixture[str], factory_dir: Path, fn: str, needle: str) -> None:
    assert_usage_error(*run_cli(capsys, "inspect", f"clifactories:{fn}")[::2], needle)


def test_factory_import_error(capsys: pytest.CaptureFixture[str], factory_dir: Path) -> None:
    assert_usage_error(*run_cli(capsys, "inspect", "clibroken:fn")[::2], "ModuleNotFoundError")


def test_batch_only_for_hf(capsys: pytest.CaptureFixture[str], factory_dir: Path) -> None:
    assert_usage_error(*run_cli(capsys, "inspect", "clifactories:good", "--batch", "2")[::2], "hf:PATH")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--policy", "nosuch"], "unknown policy 'nosuch'"),
        (["--policy", "sparse"], "--policy sparse needs --window"),
        (["--policy", "sparse", "--window", "0"], "--window must be >= 1, got 0"),
        (["--policy", "dense", "--window", "8"], "--window is not a flag of --policy dense (--window goes with --policy sparse;"),
        (["--policy", "dense", "--sinks", "8"], "--sinks goes with --policy sparse or condense"),
        (["--policy", "merge", "--ratio", "1.5"], "--ratio must be a number in [0, 1)"),
        (["--policy", "merge", "--ratio", "0.5", "--mode", "bad"], "--mode must be one of"),
        (["--policy", "auto", "--budget", "0.1", "--candidates", '[{"policy": "sparse"}]'],
         '--candidates: the "sparse" policy object needs the key "window"'),
    ],
)
def test_bad_policy_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], needle: str) -> None:
    code, _, err = run_cli(capsys, "rewrite", "clifactories:good", "-o", str(tmp_path / "o.pt2"), *flags)
    assert_usage_error(code, err, needle)
    assert not re.search(r"\b[A-Z][a-z]+\.[a-z_]+\b|__init__|positional argument", err), "Python words: " + err


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "the following arguments are required: COMMAND"),
        (["rewrite", "clifactories:good"], "attnrw rewrite: error: the following arguments are required: -o/--output"),
        (["inspect", "clifactories:good", "--bogus"], "unrecognized arguments: --bogus"),
        (["rewrite", "clifactories:good", "-o", "x.pt2", "--window"], "--window: expected one argument"),
        (["bench", "clifactories:good", "--repeat", "many"], "--repeat: invalid int value: 'many'"),
    ],
)
def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert_usage_error(code, err, needle, "--help")
    assert "usage:" not in err


def test_policy_flags_parse() -> None:
    ns = cli.build_parser().parse_args(
        ["rewrite", "m.pt2", "-o", "x.pt2", "--policy", "sparse", "--window", "16", "--sinks", "2", "--block-size", "8"]
    )
    d = cli.policy_from_args(ns).to_dict()
    assert (d["policy"], d["window"], d["sinks"], d["block_size"], d["topk"]) == ("sparse", 16, 2, 8, 0)
    assert cli.policy_from_args(cli.build_parser().parse_args(["rewrite", "m.pt2", "-o", "x"])).name == "dense"


def test_existing_output_needs_force(capsys: pytest.CaptureFixture[str], factory_dir: Path) -> None:
    out = factory_dir / "out.pt2"
    out.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "rewrite", "clifactories:good", "-o", str(out))
    assert_usage_error(code, err, "exists", "--force")
    assert out.read_bytes() == b"keep me"


def test_missing_output_folder(capsys: pytest.CaptureFixture[str], factory_dir: Path) -> None:
    code, _, err = run_cli(capsys, "rewrite", "clifactories:good", "-o", str(factory_dir / "nodir" / "o.pt2"))
    assert_usage_error(code, err, "does not exist")


def _unwritable_folder() -> Path:
    """A folder that exists but cannot be written in, even as root (sysfs); skip where there is none."""
    folder = Path("/sys")
    if not folder.is_dir() or os.access(folder, os.W_OK) and _can_create_in(folder):
        pytest.skip("no unwritable folder on this machine")
    return folder


def _can_create_in(folder: Path) -> bool:
    try:
        (folder / ".attnrw-test-probe").touch()
    except OSError:
        return False
    (folder / ".attnrw-test-probe").unlink()
    return True


@pytest.mark.parametrize(
    "argv",
    [
        ["rewrite", "clifactories:marks", "-o", "{folder}/m.pt2"],
        ["export", "clifactories:marks", "-o", "{folder}/m.onnx"],
        ["bench", "clifactories:marks", "--plan-out", "{folder}/plan.json", "--policy", "auto", "--budget", "0.1"],
        ["bench", "clifactories:marks", "--plot", "{folder}/plan.png"],
    ],
)
def test_unwritable_output_folder_is_found_before_loading(
    capsys: pytest.CaptureFixture[str], factory_dir: Path, argv: list[str]
) -> None:
    folder = _unwritable_folder()
    argv = [a.format(folder=folder) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    out = next(a for a in argv if a.startswith(str(folder)))
    assert_usage_error(code, err, f"cannot write {out!r}", "not writable")
    assert ".partial" not in err and ".probe" not in err, "no internal temporary name"
    assert not (factory_dir / "loaded.marker").exists(), "the model must not be loaded before the check"


def test_export_existing_output_needs_force(capsys: pytest.CaptureFixture[str], factory_dir: Path) -> None:
    out = factory_dir / "m.onnx"
    out.write_bytes(b"keep me")
    assert_usage_error(*run_cli(capsys, "export", "clifactories:good", "-o", str(out))[::2], "--force")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--opset", "12"], "opset"),
        (["--opset", "99"], "opset"),
    ],
)
def test_export_refusals_leave_no_file(
    capsys: pytest.CaptureFixture[str], factory_dir: Path, extra: list[str], needle: str
) -> None:
    out = factory_dir / "m.onnx"
    code, _, err = run_cli(capsys, "export", "clifactories:good", "-o", str(out), *extra)
    assert_usage_error(code, err, needle)
    assert not out.exists()
    assert [p.name for p in factory_dir.iterdir() if p.name.startswith(".m.onnx")] == []


def test_export_bad_spec_and_unwritable_path(capsys: pytest.CaptureFixture[str], factory_dir: Path) -> None:
    code, _, err = run_cli(capsys, "export", "nosuchpkg_attnrw:fn", "-o", str(factory_dir / "m.onnx"))
    assert code == 2 and "nosuchpkg_attnrw" in err
    blocker = factory_dir / "afile"
    blocker.write_text("")
    for out in (blocker / "m.onnx", blocker / "sub" / "m.onnx"):
        code, _, err = run_cli(capsys, "export", "clifactories:good", "-o", str(out))
        assert_usage_error(code, err, f"{str(blocker)!r} is a file, not a folder")
    assert not (factory_dir / "m.onnx").exists()


# --- MODEL forms ------------------------------------------------------------------------


def test_load_factory_from_zoo() -> None:
    loaded = cli.load_model("tests.zoo:bert_eager")
    assert isinstance(loaded.model, torch.nn.Module) and loaded.args == ()
    assert set(loaded.kwargs) == {"input_ids", "attention_mask"}


def test_load_factory_two_tuple(factory_dir: Path) -> None:
    loaded = cli.load_model("clifactories:good")
    assert loaded.kwargs == {} and loaded.args[0].shape == (2, 4)
    assert str(factory_dir) not in sys.path, "the current directory is put on sys.path only for the import"


def test_load_pt2(tmp_path: Path) -> None:
    x = torch.randn(3, 4)
    ep = torch.export.export(torch.nn.Linear(4, 2), (x,))
    torch.export.save(ep, tmp_path / "lin.pt2")
    loaded = cli.load_model(str(tmp_path / "lin.pt2"))
    assert isinstance(loaded.model, torch.export.ExportedProgram)
    torch.testing.assert_close(loaded.args[0], x)


def test_load_bad_pt2(tmp_path: Path) -> None:
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    with pytest.raises(ModelSpecError, match="torch.export.load"):
        cli.load_model(str(tmp_path / "bad.pt2"))


def _save_hf(name: str, folder: Path, safetensors: bool = True) -> None:
    model, _, _ = ZOO[name]()
    if safetensors:
        model.save_pretrained(folder)
    else:  # transformers 5 always writes safetensors: write a pickled checkpoint by hand
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")


def test_hf_text_inputs(tmp_path: Path) -> None:
    _save_hf("bert_sdpa", tmp_path)
    loaded = cli.load_model(f"hf:{tmp_path}", batch=3, seq_len=10)
    assert loaded.kwargs["input_ids"].shape == (3, 10)
    assert loaded.kwargs["attention_mask"].shape == (3, 10)
    loaded.model(**loaded.kwargs)


def test_hf_encoder_decoder_inputs(tmp_path: Path) -> None:
    _save_hf("bart_eager", tmp_path)
    loaded = cli.load_model(f"hf:{tmp_path}", seq_len=6)
    assert loaded.kwargs["decoder_input_ids"].shape == (1, 6)
    assert loaded.model.config.use_cache is False and "use_cache" not in loaded.kwargs
    loaded.model(**loaded.kwargs)  # no cache object in the output: torch.export can flatten it


def test_hf_vision_inputs(tmp_path: Path) -> None:
    _save_hf("vit_eager", tmp_path)
    loaded = cli.load_model(f"hf:{tmp_path}", batch=2)
    assert loaded.kwargs["pixel_values"].shape == (2, 3, 32, 32)


def test_hf_seq_len_beyond_positions(tmp_path: Path) -> None:
    _save_hf("bert_eager", tmp_path)
    with pytest.raises(ModelSpecError, match="max_position_embeddings"):
        cli.load_model(f"hf:{tmp_path}", seq_len=1000)


def test_hf_refuses_pickled_weights(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _save_hf("bert_eager", tmp_path, safetensors=False)
    assert not list(tmp_path.glob("*.safetensors"))
    assert_usage_error(*run_cli(capsys, "inspect", f"hf:{tmp_path}")[::2], "no safetensors weights")


def test_hf_folder_without_weights(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model, _, _ = ZOO["bert_eager"]()
    model.config.save_pretrained(tmp_path)
    code, _, err = run_cli(capsys, "inspect", f"hf:{tmp_path}")
    assert_usage_error(code, err, "has a config.json but no weights", "save_pretrained")
    assert "pickled" not in err


# --- dynamic sequence axis and atomic writes ----------------------------------------------


@pytest.mark.parametrize("name", ["bert_eager", "nn_transformer_decoder"])
def test_dynamic_seq_shapes_export(name: str) -> None:
    model, args, kwargs = ZOO[name]()
    shapes = dynamic_seq_shapes(model, args, kwargs)
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes)
    assert cli.dynamic_axes(ep), "the sequence axis should stay dynamic"


def test_dynamic_seq_on_a_fixed_length_model(capsys: pytest.CaptureFixture[str], factory_dir: Path) -> None:
    """A model that fixes the sequence length is refused in one line naming the input, and nothing is written."""
    out = factory_dir / "fixed.pt2"
    code, _, err = run_cli(capsys, "rewrite", "clifactories:fixed_length", "-o", str(out), "--dynamic-seq")
    assert_usage_error(code, err, "cannot vary", "x (dim 1, fixed to 8)", "--dynamic-seq")
    assert not out.exists()


def test_write_atomically_moves_into_place(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"

    def write(tmp: Path) -> None:
        (tmp / "m.onnx.data").write_bytes(b"weights")
        (tmp / "m.onnx").write_bytes(b"graph")

    write_atomically(out, write)
    assert out.read_bytes() == b"graph" and (tmp_path / "m.onnx.data").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_write_atomically_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "m.pt2"

    def write(tmp: Path) -> None:
        (tmp / "m.pt2").write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_atomically(out, write)
    assert list(tmp_path.iterdir()) == []


# --- end to end ---------------------------------------------------------------------------


def _attnrw_ops(program: torch.export.ExportedProgram) -> int:
    return sum(1 for n in program.graph.nodes if getattr(n.target, "namespace", None) == "attnrw")


def _assert_same_outputs(program: torch.export.ExportedProgram, name: str, **override: torch.Tensor) -> None:
    """The program's outputs equal the eager model's within 1e-5 (fp32, exact rewrite)."""
    model, args, kwargs = ZOO[name]()
    kwargs = {**kwargs, **override}
    with torch.no_grad():
        expected = outputs_to_tensors(model(*args, **kwargs))
        got = outputs_to_tensors(program.module()(*args, **kwargs))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_inspect_factory(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "inspect", "tests.zoo:bert_eager")
    assert code == 0, err
    assert "2 attention site(s)" in out and "encoder.layer.1.attention.self" in out
    summary = out.splitlines()[0]
    assert summary.endswith("(read only)") and "rewritten" not in summary, summary
    code, out, err = run_cli(capsys, "inspect", "tests.zoo:bert_eager", "--json")
    assert code == 0, err
    assert [s["module_path"] for s in json.loads(out)["sites"]] == [
        "encoder.layer.0.attention.self",
        "encoder.layer.1.attention.self",
    ]


def test_rewrite_round_trip_and_force(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "bert.pt2"
    code, stdout, err = run_cli(capsys, "rewrite", "tests.zoo:bert_eager", "-o", str(out))
    assert code == 0, err
    assert "2 call(s) to torch.ops.attnrw" in stdout
    assert [p.name for p in tmp_path.iterdir()] == ["bert.pt2"], "no temporary file is left behind"
    program = torch.export.load(out)
    assert _attnrw_ops(program) == 2
    _assert_same_outputs(program, "bert_eager")

    before = out.stat().st_mtime_ns
    code, _, err = run_cli(capsys, "rewrite", "tests.zoo:bert_eager", "-o", str(out), "--force")
    assert code == 0, err
    assert out.stat().st_mtime_ns != before


def test_rewrite_dynamic_seq(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "bert_dyn.pt2"
    code, _, err = run_cli(capsys, "rewrite", "tests.zoo:bert_sdpa", "-o", str(out), "--dynamic-seq")
    assert code == 0, err
    program = torch.export.load(out)
    ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    _assert_same_outputs(program, "bert_sdpa", input_ids=ids, attention_mask=mask)


def test_rewrite_sparse_policy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "gpt2_sparse.pt2"
    flags = ["--policy", "sparse", "--window", "4", "--sinks", "1"]
    code, stdout, err = run_cli(capsys, "rewrite", "tests.zoo:gpt2_eager", "-o", str(out), *flags)
    assert code == 0, err
    assert "policy sparse" in stdout
    program = torch.export.load(out)
    assert _attnrw_ops(program) == 2
    _, args, kwargs = ZOO["gpt2_eager"]()
    with torch.no_grad():
        assert all(t.isfinite().all() for t in outputs_to_tensors(program.module()(*args, **kwargs)))


def _printed_error(stdout: str, prefix: str) -> tuple[float, float | None]:
    """(relative L2, pooled cosine or None) from the error line that starts with ``prefix``."""
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith(prefix)]
    rel = float(re.search(r"relative L2 ([0-9.e+-]+)", line).group(1))
    cos = re.search(r"cosine of the mean-pooled token output ([0-9.]+)", line)
    return rel, float(cos.group(1)) if cos else None


@pytest.mark.parametrize("command, suffix", [("rewrite", ".pt2"), ("export", ".onnx")])
def test_lossy_commands_print_the_error_against_the_unmodified_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, suffix: str
) -> None:
    if command == "export":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"bert{suffix}"
    flags = ["--policy", "sparse", "--window", "2", "--sinks", "0"]
    code, stdout, err = run_cli(capsys, command, "tests.zoo:bert_sdpa", "-o", str(out), *flags)
    assert code == 0, err
    prefix = "error against" if command == "rewrite" else "error of the ONNX file (onnxruntime) against"
    rel, cos = _printed_error(stdout, prefix)
    model, args, kwargs = ZOO["bert_sdpa"]()
    program = attnrw.rewrite(model, args, kwargs, policy=attnrw.Sparse(window=2, sinks=0))
    with torch.no_grad():
        ref = float_leaves(model(*args, **kwargs))
        got = float_leaves(program.module()(*args, **kwargs))
    assert rel == pytest.approx(relative_l2(got, ref), rel=0.01) and rel > 1e-3
    mask = kwargs["attention_mask"].double().unsqueeze(-1)
    pooled = [(t.double() * mask).sum(1) / mask.sum(1) for t in (got[0], ref[0])]
    expected = torch.nn.functional.cosine_similarity(*pooled, dim=-1).min().item()
    assert cos == pytest.approx(expected, abs=1e-3)


def test_bench_prints_relative_l2_and_pooled_cosine(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run_cli(capsys, "bench", "tests.zoo:bert_sdpa", "--policy", "sparse", "--window", "2",
                                "--sinks", "0", "--repeat", "1")
    assert code == 0, err
    rel, cos = _printed_error(stdout, "end to end")
    assert rel > 1e-3 and cos is not None and -1 <= cos <= 1


def test_exact_rewrite_prints_no_error_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, stdout, err = run_cli(capsys, "rewrite", "tests.zoo:bert_sdpa", "-o", str(tmp_path / "m.pt2"))
    assert code == 0, err
    assert "error against" not in stdout


def test_pt2_model_form(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model, args, kwargs = ZOO["mha_cross_batch_first"]()
    torch.export.save(torch.export.export(model, args, kwargs), tmp_path / "mha.pt2")
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "mha.pt2"))
    assert code == 0, err
    assert "1 attention site(s)" in out
    code, _, err = run_cli(capsys, "rewrite", str(tmp_path / "mha.pt2"), "-o", str(tmp_path / "mha.attnrw.pt2"))
    assert code == 0, err
    _assert_same_outputs(torch.export.load(tmp_path / "mha.attnrw.pt2"), "mha_cross_batch_first")


@pytest.mark.parametrize(
    "flags, shown",
    [
        ([], "dynamic: input_ids dim 1, attention_mask dim 1"),
        (["--static-shapes"], "static shapes"),
    ],
)
def test_hf_text_models_keep_the_sequence_dynamic_by_default(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], shown: str
) -> None:
    _save_hf("bert_sdpa", tmp_path / "bert")
    out = tmp_path / "bert.pt2"
    code, stdout, err = run_cli(capsys, "rewrite", f"hf:{tmp_path / 'bert'}", "--seq-len", "12", "-o", str(out), *flags)
    assert code == 0, err
    assert shown in stdout, stdout
    module = torch.export.load(out).module()
    ids = torch.randint(1, 100, (1, 9))
    mask = torch.ones(1, 9, dtype=torch.long)
    if flags:
        with pytest.raises(Exception, match="12"):
            module(input_ids=ids, attention_mask=mask)
    else:
        got = module(input_ids=ids, attention_mask=mask)
        assert isinstance(got, dict) and got["last_hidden_state"].shape[1] == 9


def test_dynamic_seq_and_static_shapes_contradict(capsys: pytest.CaptureFixture[str], factory_dir: Path) -> None:
    code, _, err = run_cli(capsys, "rewrite", "clifactories:good", "-o", "o.pt2", "--dynamic-seq", "--static-shapes")
    assert_usage_error(code, err, "--dynamic-seq and --static-shapes")


def test_plain_outputs_replace_library_containers() -> None:
    """A program that returned a ModelOutput returns a dict of its fields; a namedtuple becomes a tuple."""
    model, args, kwargs = ZOO["bert_sdpa"]()
    program = torch.export.export(model, args, kwargs)
    assert cli.plain_outputs(program) == [type(model(*args, **kwargs)).__qualname__]
    with torch.no_grad():
        got, ref = program.module()(*args, **kwargs), model(*args, **kwargs)
    assert type(got) is dict and list(got) == list(ref.keys())
    torch.testing.assert_close(got["last_hidden_state"], ref.last_hidden_state)

    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor):
            return torch.return_types.max(x.max(-1))

    pair = torch.export.export(Pair(), (torch.randn(2, 3),))
    assert cli.plain_outputs(pair) and type(pair.module()(torch.randn(2, 3))) is tuple


def test_hf_folder_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _save_hf("bert_eager", tmp_path / "bert")
    code, out, err = run_cli(capsys, "inspect", f"hf:{tmp_path / 'bert'}", "--seq-len", "8", "--batch", "2")
    assert code == 0, err
    assert "2 attention site(s)" in out


def test_export_onnx(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bert.onnx"
    code, stdout, err = run_cli(capsys, "export", "tests.zoo:bert_sdpa", "-o", str(out))
    assert code == 0, err
    assert "verified in onnxruntime" in stdout and out.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["bert.onnx"]


# --- the console script -----------------------------------------------------------------


def test_console_script_smoke(tmp_path: Path) -> None:
    """The installed ``attnrw`` script: a usage error, and reading back a rewritten HF program.

    A fresh process has not imported transformers, whose output types the program names.
    """
    script = Path(sys.executable).with_name("attnrw")
    if not script.exists():
        pytest.skip("the attnrw console script is not installed (pip install -e .)")
    bad = subprocess.run(
        [str(script), "inspect", "nonsense"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "cannot use MODEL" in bad.stderr

    model, args, kwargs = ZOO["bert_eager"]()
    torch.export.save(torch.export.export(model, args, kwargs), tmp_path / "bert.pt2")
    ok = subprocess.run(
        [str(script), "inspect", str(tmp_path / "bert.pt2")],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert ok.returncode == 0, ok.stderr
    assert "2 attention site(s)" in ok.stdout
    assert ok.stderr.strip() == "", "no warnings at the default verbosity"
