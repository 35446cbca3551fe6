"""Atomic outputs and the doit file checker: a failed write leaves nothing under the
final name; a `touch` is not a change; a same-size edit is; digests are cached by
(size, mtime, inode) so a multi-GB file is read once; sparse holes are skipped."""
from __future__ import annotations

import os

import pytest

from pipeline import files
from pipeline.files import DigestCache, atomic_path, data_extents, fast_digest
from pipeline.graph import DigestChecker


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COS_BUILD_DIR", str(tmp_path / "build"))
    fresh = DigestCache()
    monkeypatch.setattr(files, "DIGESTS", fresh)
    return fresh


def test_atomic_path_renames_only_on_success(tmp_path):
    final = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"whole")
    assert final.read_bytes() == b"whole"
    assert oct(final.stat().st_mode & 0o777) != oct(0o600)


def test_atomic_path_removes_parts_left_by_a_killed_run(tmp_path):
    stale = tmp_path / ".out.bin.abc123.part"
    stale.write_bytes(b"left by SIGKILL")
    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"x")
    assert not stale.exists()


def test_checker_touch_is_not_a_change_but_an_edit_is(tmp_path, cache):
    f = tmp_path / "dep"
    f.write_bytes(b"a" * 4096)
    checker = DigestChecker()
    state = checker.get_state(str(f), None)
    os.utime(f, (1, 1))
    assert not checker.check_modified(str(f), os.stat(f), state)
    f.write_bytes(b"b" * 4096)  # same size, new content
    assert checker.check_modified(str(f), os.stat(f), state)


def test_digest_is_read_once_per_file_version(tmp_path, cache, monkeypatch):
    f = tmp_path / "big"
    f.write_bytes(os.urandom(1 << 20))
    calls = []
    real = files.fast_digest
    monkeypatch.setattr(files, "fast_digest", lambda p: calls.append(p) or real(p))
    first = cache.fast(f)
    assert cache.fast(f) == first and len(calls) == 1
    cache.save()
    again = DigestCache()  # a later doit run: loaded from disk, not recomputed
    assert again.fast(f) == first and len(calls) == 1
    os.utime(f, (5, 5))
    assert again.fast(f) == first and len(calls) == 2


def test_fast_digest_skips_holes_but_sees_data(tmp_path):
    f = tmp_path / "sparse.raw"
    with open(f, "wb") as out:
        out.truncate(256 << 20)
        out.seek(100 << 20)
        out.write(b"data")
    extents = list(data_extents(os.open(f, os.O_RDONLY), f.stat().st_size))
    assert sum(length for _, length in extents) < 1 << 20
    before = fast_digest(f)
    with open(f, "r+b") as out:
        out.seek(100 << 20)
        out.write(b"DATA")
    assert fast_digest(f) != before


def test_sha256_matches_hashlib(tmp_path, cache):
    import hashlib
    f = tmp_path / "x"
    f.write_bytes(b"hello")
    assert cache.sha256(f) == hashlib.sha256(b"hello").hexdigest()


def test_sha256_of_a_sparse_file_equals_reading_it_all(tmp_path):
    import hashlib
    f = tmp_path / "sparse.raw"
    with open(f, "wb") as out:
        out.truncate(64 << 20)
        for off in (0, 5 << 20, (64 << 20) - 3):
            out.seek(off)
            out.write(b"xyz")
    assert files.hash_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_replacing_a_large_output_swaps_atomically_and_cleans_up(tmp_path):
    import threading
    final = tmp_path / "disk.raw"
    with open(final, "wb") as f:
        f.truncate(files.BACKGROUND_DELETE_BYTES)  # sparse: large by size, cheap to make
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new"
    for t in threading.enumerate():
        if t.name.startswith("discard "):
            t.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw"]
