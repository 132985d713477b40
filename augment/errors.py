"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The CLI prints ``augment: error: <message>`` and exits with 2.

    The message must name the problem and the fix in one line.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
