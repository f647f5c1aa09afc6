"""Typed errors a user can cause. Each message says what to do about it."""

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


class PlanError(AttnrwError, ValueError):
    """A saved plan does not fit the model it is applied to."""
