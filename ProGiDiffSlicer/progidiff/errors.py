"""One error type for every failure a user can fix, with the exit code the CLI uses.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``; the
Slicer module shows the same text in its status area.
"""
from __future__ import annotations


class ProGiDiffError(Exception):
    """A failure caused by the input or the environment, with advice for the user.

    ``message`` says what is wrong and what to do, in one line.
    """

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(ProGiDiffError):
    """Unreadable, missing or unsuitable input image / arguments (exit code 2)."""

    exit_code = 2


class PromptError(ProGiDiffError):
    """The prompt does not name an organ the model knows (exit code 3)."""

    exit_code = 3


class ModelError(ProGiDiffError):
    """Model folder missing, incomplete, corrupt or incompatible (exit code 4)."""

    exit_code = 4


class OutputError(ProGiDiffError):
    """Output folder not writable or already holding results (exit code 5)."""

    exit_code = 5


class Cancelled(ProGiDiffError):
    """The run was cancelled by the user (exit code 130, as for Ctrl-C)."""

    exit_code = 130
