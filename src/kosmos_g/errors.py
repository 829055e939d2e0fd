"""Exceptions that the library raises and the ``kosmos-g`` command line reports.

They live here, not in :mod:`kosmos_g.cli`, so that library code never imports the CLI.
"""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """An error whose message is the whole story: the CLI prints its first line, without a traceback."""
