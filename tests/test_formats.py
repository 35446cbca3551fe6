"""Disk formats (pipeline/formats.py) from a small raw disk, checked with qemu-img and
tar: the qcow2 holds the same guest bytes; the Azure VHD is fixed, its virtual size a
whole MiB, its footer valid (cookie, sizes, checksum) with the build's timestamp and
UUID; the GCE tar.gz holds one sparse oldgnu member disk.raw of a whole GiB whose bytes
are the raw disk padded with zeros; each format is byte-identical when rebuilt."""
from __future__ import annotations

import gzip
import json
import os
import struct
import tarfile

import pytest

from pipeline import formats
from pipeline.artifacts import BootInputs
from tests.synthetic import SDE, need_tools, run

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> BootInputs:
    d = tmp_path_factory.mktemp("fmt-inputs")
    for n in ("rootfs.squashfs", "vmlinuz", "initrd"):
        (d / n).write_bytes(b"")
    return BootInputs(d / "rootfs.squashfs", d / "vmlinuz", d / "initrd", sde=SDE, seed="fmt-seed")


def make_raw(path, size: int):
    """A sparse file with data at the start, the middle and the very end."""
    with open(path, "wb") as f:
        f.truncate(size)
        for at in (0, size // 2, size - 4096):
            f.seek(at)
            f.write(os.urandom(4096))
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    need_tools("qemu-img", "tar", "gzip")
    return make_raw(tmp_path_factory.mktemp("fmt") / "disk.raw", 12 * MIB)


def test_qcow2_same_guest_bytes(raw, inputs, tmp_path):
    out = formats.Qcow2().convert(raw, tmp_path / "d.qcow2", inputs)
    info = json.loads(run("qemu-img", "info", "--output=json", out))
    assert info["format"] == "qcow2" and info["virtual-size"] == raw.stat().st_size
    assert "Images are identical" in run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, out)
    again = formats.Qcow2().convert(raw, tmp_path / "again.qcow2", inputs)
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("size", [12 * MIB, 12 * MIB + 5 * 512], ids=["whole-mib", "padded"])
def test_azure_vhd_fixed_with_valid_footer(size, inputs, tmp_path):
    src = make_raw(tmp_path / "disk.raw", size)
    out = formats.AzureVhd().convert(src, tmp_path / "d.vhd", inputs)
    virtual = -(-size // MIB) * MIB
    assert out.stat().st_size == virtual + 512
    footer = formats.read_vhd_footer(out)
    assert footer["checksum_ok"]
    assert footer["disk_type"] == 2                                    # fixed
    assert footer["current_size"] == footer["original_size"] == virtual
    assert footer["timestamp"] == SDE
    assert footer["uuid"] == inputs.uuid("azure-vhd").hex
    info = json.loads(run("qemu-img", "info", "-f", "vpc", "--output=json", out))
    assert info["virtual-size"] == virtual
    assert "Images are identical" in run("qemu-img", "compare", "-f", "raw", "-F", "vpc", src, out)
    # the checksum is real: one flipped byte in the footer makes it wrong
    data = bytearray(out.read_bytes()[-512:])
    data[100] ^= 1
    assert formats.vhd_checksum(bytes(data)) != struct.unpack_from(">I", data, 64)[0]
    again = formats.AzureVhd().convert(src, tmp_path / "again.vhd", inputs)
    assert again.read_bytes() == out.read_bytes()


def test_gce_tar_holds_disk_raw_padded_to_gib(raw, inputs, tmp_path):
    out = formats.GceTar().convert(raw, tmp_path / "d.tar.gz", inputs)
    head = out.read_bytes()[:10]
    assert head[:2] == b"\x1f\x8b" and struct.unpack_from("<I", head, 4)[0] == 0   # gzip -n: no mtime
    with tarfile.open(out, "r:gz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["disk.raw"]
        m = members[0]
        assert m.type == tarfile.GNUTYPE_SPARSE                        # oldgnu sparse member
        assert m.size == 1024 * MIB and (m.uid, m.gid, m.mtime) == (0, 0, SDE)
    run("tar", "-xzSf", out, "-C", tmp_path)
    disk = tmp_path / "disk.raw"
    assert disk.stat().st_size == 1024 * MIB
    data = raw.read_bytes()
    with open(disk, "rb") as f:
        assert f.read(len(data)) == data
        while chunk := f.read(64 * MIB):
            assert chunk.count(0) == len(chunk)
    with gzip.open(out) as g:  # tar format really is GNU (magic 'ustar  \0')
        assert g.read(512)[257:265] == b"ustar  \0"


def test_gce_tar_reproducible(raw, inputs, tmp_path):
    a = formats.GceTar().convert(raw, tmp_path / "a.tar.gz", inputs)
    os.utime(raw)  # a newer raw file with the same bytes changes nothing
    b = formats.GceTar().convert(raw, tmp_path / "b.tar.gz", inputs)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "b.tar.gz"]
