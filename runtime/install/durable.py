"""fsync helpers: an image or a rename must be on disk before cos-deploy reports success
(the next step is often a reboot or a power-off)."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable."""
    fsync_file(directory)
