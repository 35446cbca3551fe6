"""fsync helpers: an image or a rename must be on disk before cos-deploy reports success
(the next step is often a reboot or a power-off)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..system import write_atomic


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable."""
    fsync_file(directory)


def write_record(path: Path, data: dict[str, Any]) -> None:
    """A small JSON record (journal, image record) written atomically and made durable."""
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), mode=0o644)
    fsync_dir(path.parent)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record, or None when absent or unreadable (a torn write cannot happen: atomic)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_record(path: Path) -> None:
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)
