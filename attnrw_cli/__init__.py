"""The ``attnrw`` console script: answers what the command line alone decides before importing torch.

Importing torch and attnrw's kernels takes seconds; ``attnrw --help``, a
misspelt flag or a policy flag the policy does not take need neither. The
launcher parses the command line with the parser of :mod:`attnrw_cli.parser`
built from a snapshot of the built-in policies' fields
(:mod:`attnrw_cli.builtin_policies`) and runs the checks that need no model
(:func:`attnrw_cli.parser.check_command_line`); only a command line that
passes them is handed to :func:`attnrw.cli.main`, which parses it again
against the live policy registry and does the work.

Checks that need attnrw's code stay there: a policy field's range
(``--window 0``), flags of a non-scalar type (``--protect``, JSON) and MODEL.
The output paths are checked here, with :func:`attnrw_cli.files.check_output`.

This package imports only the standard library (``tests/test_layering.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import metadata

from attnrw_cli.errors import AttnrwError
from attnrw_cli.parser import EXIT_USAGE, build_parser, check_command_line

__all__ = ["main", "version"]


def version() -> str:
    """attnrw's installed version (``attnrw.__version__`` once torch is imported)."""
    try:
        return metadata.version("attnrw")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attnrw`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    from attnrw_cli.builtin_policies import SPEC

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = build_parser(SPEC, version()).parse_args(args)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    try:
        check_command_line(ns, SPEC)
    except AttnrwError as e:
        print(f"attnrw: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from attnrw.cli import main as run

    return run(args)
