"""The base of every error users see: what went wrong, and what to do about it."""
from __future__ import annotations


class HintedError(Exception):
    """A failure with a clear message and, when we know one, a hint. pipeline.errors
    and cloud.errors subclass it; doit tasks show any of them as one clean failure."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  hint: {hint}")

    def __reduce__(self) -> tuple[type[HintedError], tuple[str, str | None]]:  # keep message and hint apart across processes (cloud uploads)
        return type(self), (self.message, self.hint)
