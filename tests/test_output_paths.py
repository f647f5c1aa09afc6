"""Output paths a user gets wrong, found before any work, and the mode of the files written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from attnrw.errors import OutputFolderError, OutputNotWritableError, OutputPathError
from attnrw.files import check_output, write_atomically
from attnrw.rewriter.plan import Plan
from tests.test_cli import _unwritable_folder


def test_a_parent_that_is_a_file_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("")
    for path in (blocker / "m.pt2", blocker / "deeper" / "m.pt2"):
        with pytest.raises(OutputFolderError, match=f"{str(blocker)!r} is a file, not a folder"):
            check_output(path)
    with pytest.raises(OutputFolderError, match="does not exist; create it first"):
        check_output(tmp_path / "missing" / "m.pt2")


def test_an_unwritable_folder_is_found_by_the_check() -> None:
    folder = _unwritable_folder()
    with pytest.raises(OutputNotWritableError, match=f"cannot write {str(folder / 'm.pt2')!r}") as info:
        check_output(folder / "m.pt2")
    assert isinstance(info.value, OutputPathError) and isinstance(info.value, PermissionError)


def test_the_check_leaves_nothing_behind(tmp_path: Path) -> None:
    check_output(tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_have_the_mode_of_any_new_file(tmp_path: Path) -> None:
    """A plan, like every output, is readable by others as the umask allows (not a temp file's 0600)."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    plan = Plan(entries=[], budget=0.1).save(tmp_path / "plan.json")
    other = write_atomically(tmp_path / "m.bin", lambda folder: (folder / "m.bin").write_bytes(b"x"))
    assert _mode(plan) == _mode(other) == _mode(plain), (oct(_mode(plan)), oct(_mode(plain)))
    old = os.umask(0o022)
    try:
        again = Plan(entries=[], budget=0.1).save(tmp_path / "plan2.json")
    finally:
        os.umask(old)
    assert _mode(again) == 0o644
