"""Small real inputs for the artifact unit tests: a tiny squashfs holding the image's
boot menu (packages/cos-grub), and stand-in kernel/initrd files. Fast to build, and
the real tools (mkfs, xorriso, sgdisk, qemu-img) run on them exactly as on a full build."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.artifacts import BootInputs

REPO = Path(__file__).resolve().parent.parent
GRUB_PACKAGE = REPO / "packages/cos-grub/files"
SDE = 1700000000


def need_tools(*names: str) -> None:
    """Skip locally, fail in CI, when a tool is missing."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        msg = f"missing tools: {', '.join(missing)} (see scripts/apt-packages.txt)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def make_inputs(root: Path, *, with_menu: bool = True, seed: str = "test-seed", sde: int = SDE,
                payload_kib: int = 256) -> BootInputs:
    """A squashfs with /etc/cos/{grub,bootargs}.cfg (+ some incompressible payload),
    and 'kernel'/'initrd' files of random bytes (deterministic per name)."""
    need_tools("mksquashfs")
    tree = root / "tree"
    if with_menu:
        shutil.copytree(GRUB_PACKAGE, tree)
    (tree / "usr").mkdir(parents=True, exist_ok=True)
    (tree / "usr/payload").write_bytes(_bytes("payload", payload_kib * 1024))
    sqfs = root / "rootfs.squashfs"
    subprocess.run(["mksquashfs", tree, sqfs, "-quiet", "-noappend", "-no-progress",
                    "-mkfs-time", str(sde), "-all-time", str(sde), "-all-root"], check=True,
                   stdout=subprocess.DEVNULL)
    kernel, initrd = root / "vmlinuz", root / "initrd"
    kernel.write_bytes(_bytes("kernel", 300_000))
    initrd.write_bytes(_bytes("initrd", 200_000))
    return BootInputs(sqfs, kernel, initrd, sde=sde, seed=seed)


def _bytes(name: str, size: int) -> bytes:
    import hashlib
    out, i = bytearray(), 0
    while len(out) < size:
        out += hashlib.sha256(f"{name}{i}".encode()).digest()
        i += 1
    return bytes(out[:size])


def run(*cmd, merge: bool = False, **kw) -> str:
    """Run a checking tool; return its stdout (with stderr too when merge=True)."""
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True, **kw)
    if proc.returncode:
        raise AssertionError(f"{cmd[0]} failed ({proc.returncode}): {proc.stdout}{proc.stderr or ''}")
    return proc.stdout
