"""rootfs -> squashfs: the filter keeps ownership, modes, links and device nodes, refuses
unsafe paths, and tar2sqfs output is byte-identical for the same input; on the real red
image the squashfs holds systemd, the kernel, the initrd and our os-release branding."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from pipeline.config import SquashfsOptions
from pipeline.squashfs import (
    UnsafeArchive,
    filter_rootfs,
    resolve_boot_file,
    source_date_epoch,
    tar2sqfs_command,
    write_squashfs,
)

SDE = 1_700_000_000
OPTS = SquashfsOptions(compression="zstd", level=3, block_size="128K")


def _member(tar, name, type_=tarfile.REGTYPE, data=b"", **attrs):
    info = tarfile.TarInfo(name)
    info.type = type_
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    info.mtime = attrs.pop("mtime", SDE + 1000)  # newer than SDE: must be clamped
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)


def _rootfs_tar(extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _member(tar, ".dockerenv")
        _member(tar, "boot", tarfile.DIRTYPE, mode=0o755)
        _member(tar, "boot/vmlinuz-6.1", data=b"KERNEL", mode=0o644)
        _member(tar, "boot/vmlinuz", tarfile.SYMTYPE, linkname="vmlinuz-6.1")
        _member(tar, "boot/initrd-6.1", data=b"INITRD", mode=0o600)
        _member(tar, "boot/initrd", tarfile.SYMTYPE, linkname="/boot/initrd-6.1")
        _member(tar, "dev", tarfile.DIRTYPE, mode=0o755)
        _member(tar, "dev/console", data=b"", mode=0o755)
        _member(tar, "dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        _member(tar, "etc", tarfile.DIRTYPE, mode=0o755)
        _member(tar, "etc/hostname", data=b"")
        _member(tar, "etc/resolv.conf", data=b"")
        _member(tar, "home", tarfile.DIRTYPE, mode=0o755)
        _member(tar, "home/user", tarfile.DIRTYPE, mode=0o700, uid=1000, gid=1000)
        _member(tar, "home/user/notes", data=b"hi", mode=0o640, uid=1000, gid=1000)
        _member(tar, "usr", tarfile.DIRTYPE, mode=0o755)
        _member(tar, "usr/bin", tarfile.DIRTYPE, mode=0o755)
        _member(tar, "usr/bin/su", data=b"#!", mode=0o4755)
        _member(tar, "usr/bin/su-link", tarfile.LNKTYPE, linkname="usr/bin/su")
        _member(tar, "bin", tarfile.SYMTYPE, linkname="usr/bin")
        for args in extra:
            _member(tar, *args)
    return buf.getvalue()


def _filter(data: bytes, tmp_path: Path):
    out = io.BytesIO()
    cap = tmp_path / "cap"
    cap.mkdir(exist_ok=True)
    links = filter_rootfs(io.BytesIO(data), out, sde=SDE, hostname="cos-test", capture_dir=cap)
    return out.getvalue(), links, cap


def _squash(tar_bytes: bytes, out: Path) -> Path:
    subprocess.run(tar2sqfs_command(OPTS, out, SDE), input=tar_bytes, check=True)
    return out


def _listing(sqfs: Path) -> dict[str, str]:
    """path -> 'mode owner size-or-device' from unsquashfs -lln (numeric owners)."""
    out = subprocess.run(["unsquashfs", "-lln", "-d", "", str(sqfs)], check=True,
                         capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[0][0] in "-dlcb":
            name = parts[-1] if parts[0][0] != "l" else parts[-3]
            rows[name.lstrip("/")] = " ".join(parts[:3] if parts[0][0] != "c" else parts[:4])
    return rows


def test_filter_keeps_metadata_and_drops_docker_files(tmp_path):
    filtered, links, cap = _filter(_rootfs_tar(), tmp_path)
    with tarfile.open(fileobj=io.BytesIO(filtered)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert ".dockerenv" not in members and "etc/resolv.conf" not in members
        assert "dev/console" not in members
        assert tar.extractfile("etc/hostname").read() == b"cos-test\n"
        assert members["usr/bin/su"].mode == 0o4755
        assert (members["home/user/notes"].uid, members["home/user/notes"].gid) == (1000, 1000)
        assert members["dev/null"].ischr() and members["dev/null"].devminor == 3
        assert members["usr/bin/su-link"].islnk() and members["bin"].issym()
        assert all(m.mtime <= SDE for m in members.values())
    assert resolve_boot_file("boot/vmlinuz", links, cap).read_bytes() == b"KERNEL"
    assert resolve_boot_file("boot/initrd", links, cap).read_bytes() == b"INITRD"


def test_squashfs_keeps_owners_modes_devices_links(tmp_path):
    filtered, _, _ = _filter(_rootfs_tar(), tmp_path)
    rows = _listing(_squash(filtered, tmp_path / "fs.squashfs"))
    assert rows["usr/bin/su"].startswith("-rwsr-xr-x 0/0")
    assert rows["home/user"].startswith("drwx------ 1000/1000")
    assert rows["home/user/notes"].startswith("-rw-r----- 1000/1000")
    assert rows["dev/null"].startswith("crw-rw-rw- 0/0")
    assert rows["bin"].startswith("lrwxrwxrwx")


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "usr/../../evil"])
def test_unsafe_names_are_refused(tmp_path, name):
    with pytest.raises(UnsafeArchive):
        _filter(_rootfs_tar(extra=[(name,)]), tmp_path)


def test_unsafe_hardlink_target_is_refused(tmp_path):
    with pytest.raises(UnsafeArchive):
        _filter(_tar_with_link("../../etc/shadow"), tmp_path)


def _tar_with_link(target: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _member(tar, "x", tarfile.LNKTYPE, linkname=target)
    return buf.getvalue()


def test_same_input_same_bytes(tmp_path):
    filtered, _, _ = _filter(_rootfs_tar(), tmp_path)
    a = _squash(filtered, tmp_path / "a.squashfs").read_bytes()
    b = _squash(filtered, tmp_path / "b.squashfs").read_bytes()
    assert a == b


def test_missing_kernel_is_a_clear_error(tmp_path):
    from pipeline.errors import PipelineError
    with pytest.raises(PipelineError, match="setup-image"):
        resolve_boot_file("boot/vmlinuz", {}, tmp_path)


# ---- on the real red image (slow: needs the red build) ----

@pytest.mark.slow
def test_red_squashfs_content(red_build, red_paths):
    sqfs = red_paths.build / "rootfs.squashfs"
    rows = _listing(sqfs)
    for path in ("usr/lib/systemd/systemd", "boot/vmlinuz", "boot/initrd", "etc/os-release",
                 "usr/lib/cos/setup-image", "etc/dracut.conf.d/50-cos.conf", "dev/null"):
        assert path in rows, f"{path} missing from {sqfs}"
    os_release = subprocess.run(["unsquashfs", "-cat", str(sqfs), "etc/os-release"],
                                check=True, capture_output=True, text=True).stdout
    assert 'NAME="cOS"' in os_release and "VARIANT_ID=\"red\"" in os_release
    assert f'VERSION_ID="{red_build["version"]}"' in os_release
    kinds = {a["kind"]: a for a in red_build["artifacts"]}
    assert {"squashfs", "kernel", "initrd"} <= set(kinds)
    assert kinds["squashfs"]["size"] == sqfs.stat().st_size
    assert (red_paths.build / "boot/vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"  # bzImage


@pytest.mark.slow
def test_red_runtime_is_byte_compiled_with_checked_hashes(red_build, red_paths):
    """Every runtime module has its .pyc for the image's python (the read-only root can hold
    no cache made at run time), hash-based and checked against the source (flags 0b11)."""
    sqfs = red_paths.build / "rootfs.squashfs"
    rows = set(_listing(sqfs))
    lib = "usr/lib/cos/python/"
    sources = sorted(r for r in rows if r.startswith(lib) and r.endswith(".py"))
    assert len(sources) > 20, sources
    tags = {r.rsplit(".", 2)[-2] for r in rows if r.startswith(lib + "runtime/__pycache__/")}
    assert len(tags) == 1, f"one interpreter's byte-code expected: {tags}"
    tag = tags.pop()
    missing = [s for s in sources if f"{s.rsplit('/', 1)[0]}/__pycache__/{s.rsplit('/', 1)[1][:-3]}.{tag}.pyc" not in rows]
    assert not missing, f"no .pyc for {missing[:5]}"
    header = subprocess.run(["unsquashfs", "-cat", str(sqfs), f"{lib}runtime/__pycache__/__init__.{tag}.pyc"],
                            check=True, capture_output=True).stdout[:16]
    assert int.from_bytes(header[4:8], "little") == 0b11, header


@pytest.mark.slow
def test_red_squashfs_is_reproducible(red_build, red_paths, tmp_path):
    """A second build from the same image digest equals the pipeline's, squashfs and
    initrd (the pipeline's build is the first: one rebuild proves it, a third adds nothing)."""
    from pipeline.config import load_flavor
    image = json.loads(red_paths.state("image").read_text())
    out = tmp_path / "rebuild" / "rootfs.squashfs"
    write_squashfs(image["id"], load_flavor("red").squashfs, source_date_epoch(image), "cos-red",
                   out, out.parent / "boot")
    assert _same(out, red_paths.build / "rootfs.squashfs")
    assert _same(out.parent / "boot/initrd", red_paths.build / "boot/initrd")


def _same(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0
