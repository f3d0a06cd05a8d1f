"""The exit codes of `rcg` and the one error type that carries them to `main`."""
from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SERVICE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CliError(Exception):
    """An error shown as one line on stderr, exiting with `code`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def usage_error(message: str) -> CliError:
    """The caller's mistake (a flag, a file, a credential): exit 2."""
    return CliError(message, EXIT_USAGE)
