"""`cos-reset` entry point (python-run runs a module's main)."""
from __future__ import annotations

import sys

from .cli import reset_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
