"""Benchmark `doit release-red` against the local Releases API server (tests/servers/github_api.py).

Prints, for a synthetic build (2 GiB sparse raw disk with 200 MiB of data, 1 GiB sparse
VHD, 300 MiB ISO): the first release (zstd + checksums + uploads), a no-change re-run
(target: < 2 s, nothing uploaded or recompressed), and the first run against the bare
commands it stands for (zstd of both disks + sha256 of everything), as a ratio.
Run: .venv/bin/python bench/release.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.files import hash_file as sha  # noqa: E402
from tests.servers.github_api import GitHubAPIServer  # noqa: E402

VERSION = "9.9.9"
MIB = 1024 ** 2


def sparse(path: Path, size: int, data_mib: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(size // 4)
        for _ in range(data_mib):
            f.write(os.urandom(MIB))


def make_build(root: Path) -> dict[str, Path]:
    b = root / "red"
    b.mkdir(parents=True)
    files = {"iso": b / f"cOS-Seed-red-{VERSION}-x86_64.iso", "raw": b / "disk.raw",
             "azure-vhd": b / "disk.vhd", "gce-tar": b / "disk.tar.gz", "qcow2": b / "disk.qcow2"}
    with open(files["iso"], "wb") as f:
        for _ in range(300):
            f.write(os.urandom(MIB))
    sparse(files["raw"], 2048 * MIB, 200)
    sparse(files["azure-vhd"], 1024 * MIB + 512, 50)
    files["gce-tar"].write_bytes(os.urandom(20 * MIB))
    files["qcow2"].write_bytes(os.urandom(20 * MIB))
    arts = [{"kind": k, "path": p.name, "sha256": sha(p), "size": p.stat().st_size} for k, p in files.items()]
    (b / "manifest.json").write_text(json.dumps({"flavor": "red", "version": VERSION, "arch": "x86_64",
                                                 "image": {"reference": "cos-pipeline/cos:bench"},
                                                 "artifacts": arts}))
    return files



def timed(fn) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "build"
        files = make_build(root)
        server = GitHubAPIServer().start()
        env = {**os.environ, "COS_BUILD_DIR": str(root), "COS_VERSION": VERSION,
               "GITHUB_API_URL": server.api_url, "GITHUB_REPOSITORY": server.repository,
               "GITHUB_TOKEN": server.token}
        doit = [sys.executable, "-m", "doit", "--dir", str(ROOT), "release-red"]

        def release():
            subprocess.run(doit, cwd=ROOT, env=env, check=True, capture_output=True)

        def bare():
            for kind in ("raw", "azure-vhd"):
                subprocess.run(["zstd", "-3", "-T0", "-q", "-f", str(files[kind]), "-o", f"{tmp}/{kind}.zst"],
                               check=True)
            for p in [*files.values(), Path(f"{tmp}/raw.zst"), Path(f"{tmp}/azure-vhd.zst")]:
                sha(p)

        try:
            first = timed(release)
            uploads = len(server.uploads_done())
            sent = sum(len(a.data) for a in server.release(f"v{VERSION}").assets.values())
            noop = timed(release)
            again = len(server.uploads_done()) - uploads
        finally:
            server.stop()
        base = timed(bare)
    print("| measure | value |\n|---|---|")
    print(f"| first release (compress + checksum + {uploads} uploads, {sent / MIB:.0f} MiB) | {first:.1f} s |")
    print(f"| bare zstd + sha256 of the same files (no upload) | {base:.1f} s |")
    print(f"| ratio first release / bare commands | {first / base:.2f}x |")
    print(f"| no-change re-run (target < 2 s) | {noop:.2f} s, {again} uploads |")
    return 0 if again == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
