"""Typed errors a user can cause. Each message says what to do about it.

They live in the torch-free :mod:`attnrw_cli` so that the ``attnrw`` launcher raises the same
classes as the library; :mod:`attnrw.errors` and the package root re-export them.
"""

from __future__ import annotations


class AttnrwError(Exception):
    """Base class of every error attnrw raises on purpose."""


class ConfigError(AttnrwError, ValueError):
    """A policy, an option dict or a CLI flag is invalid."""


class ModelSpecError(AttnrwError, ValueError):
    """A MODEL argument (``.pt2`` file, ``pkg.module:fn`` or ``hf:PATH``) cannot be used."""


class ImplementationUnavailableError(AttnrwError, RuntimeError):
    """An explicitly requested implementation (e.g. ``impl="triton"``) cannot run here."""


class VerificationError(AttnrwError, AssertionError):
    """A rewritten or exported model does not match the reference within tolerance."""


class ExporterLimitError(AttnrwError, RuntimeError):
    """The export failed where a plain ``torch.onnx.export`` of the unmodified model fails too.

    The limit is the PyTorch ONNX exporter's or onnxruntime's (an op or dtype
    without a translation or a CPU kernel), not attnrw's. ``op`` names the
    failing op when the message had it; ``stage`` is where attnrw's export
    failed (``"export"``, ``"load"`` or ``"run"``).
    """

    def __init__(self, message: str, op: str | None = None, stage: str | None = None) -> None:
        super().__init__(message)
        self.op, self.stage = op, stage


class PlanError(AttnrwError, ValueError):
    """A saved plan does not fit the model it is applied to."""


class DynamicShapeError(AttnrwError, ValueError):
    """An axis asked to be dynamic (``dynamic_seq``, ``--dynamic-seq``) cannot vary in this model."""


class OutputPathError(AttnrwError, OSError):
    """An output path cannot be written. The subclasses say why."""


class OutputExistsError(OutputPathError, FileExistsError):
    """The output file exists and overwriting it was not asked for (``force=True``, CLI ``--force``)."""


class OutputFolderError(OutputPathError, FileNotFoundError):
    """The folder the output file should go in does not exist."""


class OutputIsFolderError(OutputPathError, IsADirectoryError):
    """The output path names a folder, not a file."""


class OutputNotWritableError(OutputPathError, PermissionError):
    """The folder the output file should go in exists but cannot be written in."""


__all__ = [
    "AttnrwError",
    "ConfigError",
    "DynamicShapeError",
    "ExporterLimitError",
    "ImplementationUnavailableError",
    "ModelSpecError",
    "OutputExistsError",
    "OutputFolderError",
    "OutputIsFolderError",
    "OutputNotWritableError",
    "OutputPathError",
    "PlanError",
    "VerificationError",
]
