"""Typed errors. The library raises these; only the CLI turns them into exit codes.

- ``UserError``: the user asked for something impossible or gave bad input (exit 2).
- ``GateFailure``: a check ran and the result is below budget (exit 1).
- ``StageFailure``: some artifacts failed; the others were produced (exit 1).
"""
from __future__ import annotations


class EdgepipeError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        msg = self.message.rstrip(".")
        return f"{msg}. {self.hint}" if self.hint else f"{msg}."


class UserError(EdgepipeError):
    """Bad input: unknown names, missing files, impossible option combinations."""

    exit_code = 2


class GateFailure(EdgepipeError):
    """A gate ran and failed (accuracy budget, full Edge TPU mapping...)."""

    exit_code = 1


class StageFailure(EdgepipeError):
    """Some units of work failed; the rest completed and was written."""

    exit_code = 1


class ConversionError(EdgepipeError):
    """A converter failed on one artifact. Caught per artifact, recorded in the manifest."""


class UnsupportedArtifact(EdgepipeError):
    """A runtime cannot run this artifact (wrong format, platform, missing library)."""
