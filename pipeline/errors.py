"""pipeline/'s error types: what went wrong, and what to do about it (core.errors)."""
from core.errors import HintedError


class PipelineError(HintedError):
    """A failure of a stage, with a clear message and, when we know one, a hint."""


class ConfigError(PipelineError):
    """A flavor file is wrong; raised before anything is built."""


class ToolMissing(PipelineError):
    """A required host tool is not installed."""
