"""Typed errors a user can cause. Each message says what to do about it.

The classes are defined in :mod:`attnrw_cli.errors` (torch-free, so that the
``attnrw`` launcher raises the same ones) and are the same objects here.
"""

from __future__ import annotations

from attnrw_cli.errors import (
    AttnrwError,
    ConfigError,
    DynamicShapeError,
    ExporterLimitError,
    ImplementationUnavailableError,
    ModelSpecError,
    OutputExistsError,
    OutputFolderError,
    OutputIsFolderError,
    OutputNotWritableError,
    OutputPathError,
    PlanError,
    VerificationError,
)

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
