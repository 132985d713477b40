"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The CLI prints ``augment: error: <message>`` and exits with 2.

    The message must name the problem and the fix in one line.
    """

    exit_code = 2

    def __init__(self, message: str, *, resumable: bool = True) -> None:
        super().__init__(" ".join(str(message).split()))
        #: False when running the same command again cannot help (a refused setting, not an interruption):
        #: the CLI then does not add "the same command resumes".
        self.resumable = resumable


class Interrupted(UserError):
    """Ctrl-C after some work was saved: the CLI writes ``metrics`` (what finished), prints the message
    and exits 130, without a traceback."""

    exit_code = 130

    def __init__(self, message: str, metrics: dict | None = None) -> None:
        super().__init__(message)
        self.metrics = metrics
