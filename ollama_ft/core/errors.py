"""The one user-facing error type: what failed, and what to do next.

Anything raised as `UserError` is printed by the CLI as one red line plus a hint and exits 1,
with no traceback (unless --verbose). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake or missing precondition the user can fix.

    message: what failed, quoting the offending value or file:line.
    hint: the next step ("run `make install`", "set OLLAMA_HOST", ...).
    details: optional extra lines (e.g. every problem found in a config), shown under the message.
    """

    def __init__(self, message: str, hint: str | None = None, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = list(details or [])

    def __str__(self) -> str:  # pragma: no cover - trivial
        parts = [self.message, *self.details]
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)

