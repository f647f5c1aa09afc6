"""Writing output files: one check of an output path and one atomic writer.

Every file attnrw writes (an exported program, an ONNX model and its
external data, a plan) goes through :func:`write_atomically`: the files are
staged in a temporary folder beside the target and moved into place only
once they are complete, the main file last, so that a reader never finds a
half-written model or a model whose data file is missing. An existing file
is overwritten only when asked (``force``).

The messages say how to ask: the Python API's default hint is
``pass force=True``; the CLI passes ``hint="pass --force"``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from attnrw_cli.errors import OutputExistsError, OutputFolderError, OutputIsFolderError, OutputNotWritableError

__all__ = ["API_HINT", "CLI_HINT", "check_output", "write_atomically"]

#: How to overwrite, in the words of the Python API and of the CLI.
API_HINT = "pass force=True"
CLI_HINT = "pass --force"


def check_output(path: str | os.PathLike, force: bool = False, hint: str = API_HINT) -> Path:
    """``path`` as a ``Path`` if a file may be written there; a typed error that says what to do otherwise.

    Raises:
        OutputIsFolderError: ``path`` is a folder.
        OutputExistsError: ``path`` exists and ``force`` is false (the
            message ends with ``hint``, e.g. ``"pass --force"``).
        OutputFolderError: the folder ``path`` should go in does not exist,
            or is a file (or lies under one).
        OutputNotWritableError: that folder cannot be written in (tried by
            creating and removing a file there, so that a command finds out
            before its work rather than after).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputIsFolderError(f"{str(path)!r} is a folder; give the path of a file (e.g. inside it)")
    if path.exists() and not force:
        raise OutputExistsError(f"{str(path)!r} exists; {hint} to overwrite it, or choose another path")
    parent = path.parent
    if not parent.is_dir():
        blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise OutputFolderError(
                f"cannot write {str(path)!r}: {str(blocker)!r} is a file, not a folder; choose a path inside a folder"
            )
        raise OutputFolderError(f"the output folder {str(parent)!r} does not exist; create it first")
    _check_writable(path, parent)
    return path


def _check_writable(path: Path, parent: Path) -> None:
    """Create and remove a file in ``parent``; :class:`OutputNotWritableError` naming ``path`` if that fails."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise OutputNotWritableError(
            f"cannot write {str(path)!r}: the folder {str(parent)!r} is not writable ({e.strerror}); "
            "choose another output path or fix the folder's permissions"
        ) from None
    os.close(fd)
    os.unlink(probe)


def write_atomically(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    force: bool = False,
    hint: str = API_HINT,
) -> Path:
    """Call ``write(folder)`` with a fresh folder beside ``path``, then move what it wrote into place.

    ``write`` must create ``folder / path.name``. Other files it leaves in
    ``folder`` (e.g. ONNX external data, named after the model file) are moved
    beside ``path`` first and the main file last, each with ``os.replace``
    (atomic within one file system). If ``write`` raises, nothing is moved;
    if a move fails, the files already moved are taken back (the ones they
    replaced restored). An existing target is replaced only with ``force``:
    :func:`check_output` runs before ``write`` and again, for every file
    ``write`` produced, before the first move.

    Returns:
        ``path``, as a ``Path``.
    """
    path = check_output(path, force, hint)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as e:  # the folder became unwritable since the check
        raise OutputNotWritableError(f"cannot write {str(path)!r}: {e.strerror}") from None
    try:
        write(staging)
        main = staging / path.name
        if not main.is_file():
            raise RuntimeError(f"the writer did not create {path.name!r} in its staging folder")
        files = sorted(p for p in staging.iterdir() if p != main) + [main]
        targets = [path.parent / p.name for p in files]
        for target in targets:
            check_output(target, force, hint)
        _move_all(files, targets, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _move_all(files: Sequence[Path], targets: Sequence[Path], staging: Path) -> None:
    """``os.replace`` each file onto its target in order; on failure undo the moves already made.

    A target that exists is first kept in ``staging`` (a hard link where the
    file system allows, else a copy), so that undoing a move restores it.
    """
    keep = staging / ".replaced"
    keep.mkdir()
    done: list[tuple[Path, Path | None]] = []  # (target, the file it replaced, kept)
    try:
        for src, dst in zip(files, targets):
            kept = None
            if dst.exists():
                kept = keep / dst.name
                try:
                    os.link(dst, kept)
                except OSError:
                    shutil.copy2(dst, kept)
            os.replace(src, dst)
            done.append((dst, kept))
    except BaseException:
        for dst, kept in reversed(done):  # a half-published model is worse than none
            if kept is not None:
                os.replace(kept, dst)
            else:
                dst.unlink(missing_ok=True)
        raise
