"""Atomic outputs and cached content digests.

A stage writes every output under a temporary name and renames it when complete,
so a stage killed half-way leaves nothing a re-run would take as done.

Digests are cached by (path, size, mtime_ns, inode): a multi-GB artifact is hashed
once after it changes, not once per dependent task and not again on every no-op
run after a `touch` (doit's MD5 checker does both, see DigestChecker).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.hashing import CHUNK, fast_digest, hash_file
from core.sparse import data_extents

__all__ = ["CHUNK", "DIGESTS", "DigestCache", "atomic_path", "data_extents", "discard", "fast_digest",
           "file_entry", "hash_file", "hold_build_lock", "write_json_atomic"]

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename onto `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{final.name}.*.part", f".{final.name}.*.old"):  # left by a killed run
        for stale in final.parent.glob(pattern):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp_path
        _replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


BACKGROUND_DELETE_BYTES = 64 << 20


def _replace(tmp: Path, final: Path) -> None:
    """Rename tmp onto final. A large file being replaced is moved aside first and deleted
    on a background thread: ext4 frees ~250 MiB in ~0.1 s, and the stage need not wait for
    it (the process still does, before it exits). Moved aside rather than renamed over:
    ext4 (auto_da_alloc) writes a file's delayed data out at once when it is renamed over
    another, ~0.15 s per 300 MiB the stage would wait for. So for an instant the old
    artifact has gone and the new one has no name yet; a crash then leaves neither, never
    half of one (the stage re-runs: doit recorded nothing)."""
    try:
        big = os.stat(final).st_size >= BACKGROUND_DELETE_BYTES
    except FileNotFoundError:
        big = False
    if not big:
        os.replace(tmp, final)
        return
    old = tmp.with_suffix(".old")
    os.replace(final, old)
    os.rename(tmp, final)
    discard(old)


def discard(path: Path) -> None:
    """Delete a file on a background (non-daemon) thread."""
    threading.Thread(target=Path(path).unlink, kwargs={"missing_ok": True},
                     name=f"discard {Path(path).name}").start()


def write_json_atomic(path: Path, data: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


_BUILD_LOCK = None


def hold_build_lock(build: Path) -> None:
    """One doit run at a time per build directory (doit's state and our outputs are not
    safe to share); a second run waits, saying why. Held until the process exits."""
    import fcntl
    import sys
    global _BUILD_LOCK
    build.mkdir(parents=True, exist_ok=True)
    _BUILD_LOCK = open(build / ".lock", "w")
    try:
        fcntl.flock(_BUILD_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for another doit run using {build} ...", file=sys.stderr, flush=True)
        fcntl.flock(_BUILD_LOCK, fcntl.LOCK_EX)


class DigestCache:
    """Digests of files by algorithm, remembered across runs in one small JSON file.

    sha256 is what the manifest and releases publish; "fast" (xxh3-128 over the file's
    data extents) is what doit's checker compares: after a `touch` of multi-GB sparse
    disks a no-op run re-reads only their allocated bytes, at memory speed.
    """

    ALGORITHMS = ("sha256", "fast")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._data: dict[str, list[Any]] = {}
        self._dirty = False

    def _load(self) -> None:
        if self._path is not None:
            return
        from .config import build_root  # late: keep this module import-light
        self._path = build_root() / ".digests.json"
        try:
            self._data = json.loads(self._path.read_text())
        except (FileNotFoundError, ValueError):
            self._data = {}
        atexit.register(self.save)

    @staticmethod
    def _key(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def _get(self, path: Path | str, algo: str) -> str:
        path = os.path.abspath(path)
        with self._lock:
            self._load()
            st = os.stat(path)
            hit = self._data.get(path)
            if hit and hit[:3] == self._key(st) and isinstance(hit[3], dict) and algo in hit[3]:
                return str(hit[3][algo])
        digest = (hash_file if algo == "sha256" else fast_digest)(path)
        self.remember(path, digest, st, algo)
        return digest

    def sha256(self, path: Path | str) -> str:
        return self._get(path, "sha256")

    def fast(self, path: Path | str) -> str:
        return self._get(path, "fast")

    def remember(self, path: Path | str, digest: str, st: os.stat_result | None = None,
                 algo: str = "sha256") -> None:
        """Record a digest the producer already computed (saves a second read)."""
        path = os.path.abspath(path)
        with self._lock:
            self._load()
            key = self._key(st or os.stat(path))
            hit = self._data.get(path)
            known = hit[3] if hit and hit[:3] == key and isinstance(hit[3], dict) else {}
            self._data[path] = key + [{**known, algo: digest}]
            self._dirty = True

    def save(self) -> None:
        with self._lock:
            if not self._dirty or self._path is None:
                return
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # forget files that are gone (old versions' artifacts), so the cache stays small
            self._data = {p: v for p, v in self._data.items() if os.path.exists(p)}
            write_json_atomic(self._path, self._data)
            self._dirty = False


DIGESTS = DigestCache()


def file_entry(kind: str, path: Path, base: Path) -> dict[str, Any]:
    """A manifest artifact entry; the digest is cached for doit's checker too."""
    return {"kind": kind, "path": str(Path(path).relative_to(base)),
            "sha256": DIGESTS.sha256(path), "size": Path(path).stat().st_size}
