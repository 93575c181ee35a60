"""Errors a user can act on. The CLI prints them as one line (no traceback unless --debug)."""
from __future__ import annotations


class PixelwiseError(Exception):
    """Base class for every error pixelwise reports to the user as a one-line message."""


class DataError(PixelwiseError):
    """A problem with a dataset file: the message names the file and the problem."""

    def __init__(self, path: object, problem: str, fix: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        msg = f"{self.path}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class CheckpointError(PixelwiseError):
    """A checkpoint that is unreadable or does not fit the model it is loaded into."""
