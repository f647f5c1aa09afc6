"""Writing output files: one check of an output path and one atomic writer.

Defined in :mod:`attnrw_cli.files` (torch-free, so that the ``attnrw``
launcher checks output paths before torch is imported); see there.
"""

from __future__ import annotations

from attnrw_cli.files import API_HINT, CLI_HINT, check_output, write_atomically

__all__ = ["API_HINT", "CLI_HINT", "check_output", "write_atomically"]
