"""Logging for doit runs: rich on a terminal, plain lines otherwise (CI logs).

Every line goes through one filter, Redact: the values of the secret variables
(core.env.VARS), SAS signatures and private keys never reach a log, whoever logs
(our loggers, the SDKs' and Python's last-resort handler alike).
"""
from __future__ import annotations

import logging
import sys

from core import env


class Redact(logging.Filter):
    """Replaces secrets in the formatted message and in the traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = env.redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = env.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = env.redact(record.stack_info)
        return True


REDACT = Redact()


def setup(level: str | None = None) -> None:
    level = level or env.get("COS_LOG") or "INFO"
    root = logging.getLogger("cos")
    if logging.lastResort is not None and REDACT not in logging.lastResort.filters:
        logging.lastResort.addFilter(REDACT)  # warnings of SDK loggers without a handler
    if root.handlers:
        return
    if sys.stderr.isatty():
        from rich.logging import RichHandler
        handler: logging.Handler = RichHandler(show_path=False, log_time_format="%H:%M:%S")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(REDACT)
    root.addHandler(handler)
    root.setLevel(level)
