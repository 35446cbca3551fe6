"""Small synthetic cloud artifacts: a sparse raw disk with data regions and holes, the
fixed VHD qemu-img makes from it, and the GCE disk.raw tar.gz, plus a manifest."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

from pipeline.files import hash_file as sha256

MIB = 1024 * 1024
RAW_SIZE = 64 * MIB

# (offset, length, kind): random data, one allocated all-zero region, data at the end.
REGIONS = [(0, MIB, "data"), (5 * MIB + 100 * 1024, 300 * 1024, "data"), (20 * MIB, 2 * MIB, "data"),
           (40 * MIB, 4 * MIB, "zeros"), (RAW_SIZE - 4096, 4096, "data")]


def make_raw(path: Path, size: int = RAW_SIZE, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length, kind in REGIONS:
            if offset + length > size:
                continue
            f.seek(offset)
            f.write(bytes(length) if kind == "zeros" else rng.randbytes(length))
    return path


def make_vhd(raw: Path, path: Path) -> Path:
    qemu = shutil.which("qemu-img")
    if not qemu:
        raise RuntimeError("qemu-img not found: apt-get install qemu-utils")
    subprocess.run([qemu, "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size",
                    str(raw), str(path)], check=True, capture_output=True)
    return path


def make_gce_tar(raw: Path, path: Path) -> Path:
    work = path.parent / "gce-src"
    work.mkdir(exist_ok=True)
    disk = work / "disk.raw"
    if disk.exists():
        disk.unlink()
    shutil.copyfile(raw, disk)  # same sparse layout is not needed for the test
    subprocess.run(["tar", "--format=gnu", "-S", "-czf", str(path), "-C", str(work), "disk.raw"],
                   check=True, capture_output=True)
    return path



def make_build(build: Path, flavor: str = "testflavor", seed: int = 1) -> dict:
    """build/<flavor>/ with raw, azure-vhd and gce-tar artifacts and a manifest listing them."""
    build.mkdir(parents=True, exist_ok=True)
    raw = make_raw(build / "disk.raw", seed=seed)
    vhd = make_vhd(raw, build / "disk.vhd")
    tar = make_gce_tar(raw, build / "disk.tar.gz")
    arts = [{"kind": k, "path": p.name, "sha256": sha256(p), "size": p.stat().st_size}
            for k, p in (("raw", raw), ("azure-vhd", vhd), ("gce-tar", tar))]
    manifest = {"schema": 1, "flavor": flavor, "version": "0.1.0", "arch": "x86_64", "artifacts": arts}
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def nonzero_ranges(path: Path, block: int) -> list[int]:
    """Indexes of `block`-sized blocks that are not all zeros (what should be sent)."""
    out = []
    with open(path, "rb") as f:
        index = 0
        while chunk := f.read(block):
            if chunk.count(0) != len(chunk):
                out.append(index)
            index += 1
    return out
