"""build/<flavor>/manifest.json: what was built, with digests; every stage adds to it.

Parallel doit tasks update it, so every read-modify-write holds a file lock, and
the file is replaced atomically.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import write_json_atomic

SCHEMA = 1


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(Path(path).read_text())
        return data
    except FileNotFoundError:
        return {"schema": SCHEMA, "artifacts": []}


@contextlib.contextmanager
def update(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the manifest as a dict; it is written back when the block ends."""
    path = Path(path)
    with _locked(path):
        data = read(path)
        yield data
        write_json_atomic(path, data)


def set_fields(path: Path, **fields: Any) -> None:
    with update(path) as data:
        data.update(fields)


def add_artifacts(path: Path, *entries: dict[str, Any]) -> None:
    """Add or replace artifacts by kind (one current artifact per kind)."""
    with update(path) as data:
        kinds = {e["kind"] for e in entries}
        kept = [a for a in data.get("artifacts", []) if a["kind"] not in kinds]
        data["artifacts"] = sorted(kept + list(entries), key=lambda a: a["kind"])


def artifact(path: Path, kind: str) -> dict[str, Any] | None:
    return next((a for a in read(path).get("artifacts", []) if a["kind"] == kind), None)
