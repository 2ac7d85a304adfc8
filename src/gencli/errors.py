"""The one place user-facing errors are shaped.

Every error a user can fix raises :class:`GencliError` with a message that names the bad value and
the fix. The CLI prints it as one paragraph and exits with ``exit_code``: 2 for a usage or
configuration error (the command line or config must change), 1 for a runtime failure (the command
was right but the run could not complete: a missing file offline, a diverging loss). A traceback is
shown only when ``HYDRA_FULL_ERROR=1`` is set.
"""

from __future__ import annotations

USAGE = 2
RUNTIME = 1


class GencliError(Exception):
    """An error the user can act on: ``message`` says what is wrong and how to fix it."""

    def __init__(self, message: str, exit_code: int = USAGE):
        super().__init__(message)
        self.message = " ".join(message.split())  # one paragraph, whatever the source formatting
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class ConfigError(GencliError):
    """A bad value on the command line or in a config (exit code 2)."""

    def __init__(self, message: str):
        super().__init__(message, USAGE)


class RuntimeFailure(GencliError):
    """The command was well formed but could not complete (exit code 1)."""

    def __init__(self, message: str):
        super().__init__(message, RUNTIME)


class Interrupted(GencliError):
    """Training was stopped by a signal after saving its state; exit code 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, 128 + int(signum))
        self.signum = int(signum)
