"""``attnrw.files``: the output check and the atomic writer every output goes through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attnrw.errors import AttnrwError, OutputExistsError, OutputFolderError, OutputIsFolderError, OutputPathError
from attnrw.files import CLI_HINT, check_output, write_atomically


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_error_hierarchy() -> None:
    """Each kind is an OutputPathError, an AttnrwError and the OSError subclass its cause has."""
    for cls, builtin in [
        (OutputExistsError, FileExistsError),
        (OutputFolderError, FileNotFoundError),
        (OutputIsFolderError, IsADirectoryError),
    ]:
        e = cls("message")
        assert isinstance(e, OutputPathError) and isinstance(e, AttnrwError) and isinstance(e, builtin)
        assert str(e) == "message"


def test_check_output_says_what_to_do(tmp_path: Path) -> None:
    assert check_output(tmp_path / "new.onnx") == tmp_path / "new.onnx"
    taken = tmp_path / "m.pt2"
    taken.write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="pass force=True to overwrite"):
        check_output(taken)
    with pytest.raises(OutputExistsError, match="pass --force to overwrite"):
        check_output(taken, hint=CLI_HINT)
    assert check_output(taken, force=True) == taken
    with pytest.raises(OutputIsFolderError, match="is a folder"):
        check_output(tmp_path, force=True)
    with pytest.raises(OutputFolderError, match="does not exist; create it first"):
        check_output(tmp_path / "no" / "m.onnx")


def test_writes_extras_first_and_the_main_file_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.onnx"
    order: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (order.append(Path(dst).name), real(src, dst)))

    def write(folder: Path) -> None:
        (folder / "m.onnx").write_bytes(b"graph")
        (folder / "m.onnx.data").write_bytes(b"weights")

    assert write_atomically(out, write) == out
    assert order == ["m.onnx.data", "m.onnx"]
    assert out.read_bytes() == b"graph" and (tmp_path / "m.onnx.data").read_bytes() == b"weights"
    assert _names(tmp_path) == ["m.onnx", "m.onnx.data"]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def write(folder: Path) -> None:
        (folder / "m.pt2").write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomically(tmp_path / "m.pt2", write)
    assert _names(tmp_path) == []


def test_writer_that_forgets_the_main_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="did not create 'm.pt2'"):
        write_atomically(tmp_path / "m.pt2", lambda folder: (folder / "other").write_text("x"))
    assert _names(tmp_path) == []


def test_never_overwrites_without_force(tmp_path: Path) -> None:
    """An existing model, or an existing data file the writer would replace, needs force; nothing is touched."""
    (tmp_path / "m.onnx.data").write_bytes(b"old weights")

    def write(folder: Path) -> None:
        (folder / "m.onnx").write_bytes(b"graph")
        (folder / "m.onnx.data").write_bytes(b"weights")

    with pytest.raises(OutputExistsError, match="m.onnx.data"):
        write_atomically(tmp_path / "m.onnx", write)
    assert _names(tmp_path) == ["m.onnx.data"] and (tmp_path / "m.onnx.data").read_bytes() == b"old weights"

    write_atomically(tmp_path / "m.onnx", write, force=True)
    assert (tmp_path / "m.onnx.data").read_bytes() == b"weights"
    with pytest.raises(OutputExistsError, match="force=True"):
        write_atomically(tmp_path / "m.onnx", write)


@pytest.mark.parametrize("existing", [True, False])
def test_failed_move_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool) -> None:
    """If moving the main file fails, the data file moved before it is taken back: the old one restored, or none."""
    if existing:
        (tmp_path / "m.onnx").write_bytes(b"old graph")
        (tmp_path / "m.onnx.data").write_bytes(b"old weights")
    real = os.replace

    def flaky(src, dst):
        if Path(dst) == tmp_path / "m.onnx":
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)

    def write(folder: Path) -> None:
        (folder / "m.onnx").write_bytes(b"new graph")
        (folder / "m.onnx.data").write_bytes(b"new weights")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(tmp_path / "m.onnx", write, force=True)
    if existing:
        assert _names(tmp_path) == ["m.onnx", "m.onnx.data"]
        assert (tmp_path / "m.onnx").read_bytes() == b"old graph"
        assert (tmp_path / "m.onnx.data").read_bytes() == b"old weights"
    else:
        assert _names(tmp_path) == []
