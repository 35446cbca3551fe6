"""The one error type users see: what went wrong, and what to do about it."""


class PipelineError(Exception):
    """A failure with a clear message and, when we know one, a hint."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  hint: {hint}")

    def __reduce__(self):  # keep message and hint apart across processes (cloud uploads)
        return type(self), (self.message, self.hint)


class ConfigError(PipelineError):
    """A flavor file is wrong; raised before anything is built."""


class ToolMissing(PipelineError):
    """A required host tool is not installed."""
