"""Logging for doit runs: rich on a terminal, plain lines otherwise (CI logs)."""
from __future__ import annotations

import logging
import sys

from core import env


def setup(level: str | None = None) -> None:
    level = level or env.get("COS_LOG") or "INFO"
    root = logging.getLogger("cos")
    if root.handlers:
        return
    if sys.stderr.isatty():
        from rich.logging import RichHandler
        handler: logging.Handler = RichHandler(show_path=False, log_time_format="%H:%M:%S")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
