"""The Secure Boot chain (pipeline/bootchain.py) on the host, with real tools:
GRUB's built-in prefix, modules and config are read out of a real GRUB EFI image; a chain
that is missing from the image or not signed is refused with the fix named; the stub a
signed GRUB reads is valid GRUB script. On the built flavor (slow, no QEMU): the chain
copied out of its image is signed (shim, MokManager, GRUB, and the kernel), the ISO's
and the disk's ESPs hold it, and the stub sits where that GRUB looks for its config."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline import artifacts, bootchain, efi
from pipeline.errors import PipelineError
from tests.synthetic import SDE, need_tools, run
from tests.test_boot import artifact


@pytest.fixture(scope="module")
def host_grub(tmp_path_factory) -> Path:
    """A GRUB EFI image as distros make theirs: built-in prefix, modules and config."""
    need_tools("grub-mkimage")
    out = tmp_path_factory.mktemp("grub") / "grubx64.efi"
    cfg = out.with_suffix(".cfg")
    cfg.write_text("normal (memdisk)/grub.cfg\n")
    run("grub-mkimage", "-O", "x86_64-efi", "-d", str(efi.grub_dir(efi.EFI_TARGET)), "-p", "/EFI/testdistro",
        "-c", cfg, "-o", out, *efi.EFI_MODULES)
    return out


def test_read_grub_finds_prefix_modules_and_config(host_grub):
    info = bootchain.read_grub(host_grub.read_bytes(), "grubx64.efi")
    assert info.prefix == "/EFI/testdistro"
    assert set(efi.EFI_MODULES) <= info.modules and "extcmd" in info.modules  # dependencies too
    assert info.config == "normal (memdisk)/grub.cfg\n"
    bootchain.require_modules(info, "grubx64.efi")
    with pytest.raises(PipelineError, match="lacks built-in modules luks2"):
        bootchain.require_modules(info, "grubx64.efi", ("luks2", "linux"))
    assert not bootchain.parse_pe(host_grub.read_bytes(), "grubx64.efi").signed


def _squashfs(tmp_path: Path, files: dict[str, Path]) -> Path:
    need_tools("mksquashfs", "rdsquashfs")
    tree = tmp_path / "tree"
    for inner, src in files.items():
        (tree / inner).parent.mkdir(parents=True, exist_ok=True)
        (tree / inner).write_bytes(src.read_bytes())
    tree.mkdir(exist_ok=True)
    out = tmp_path / "rootfs.squashfs"
    subprocess.run(["mksquashfs", tree, out, "-quiet", "-noappend", "-no-progress", "-all-time", str(SDE),
                    "-all-root"], check=True, stdout=subprocess.DEVNULL)
    return out


def test_missing_chain_names_the_packages_and_the_opt_out(tmp_path):
    sqfs = _squashfs(tmp_path, {})
    with pytest.raises(PipelineError) as err:
        bootchain.extract(sqfs, "debian", tmp_path)
    assert "/usr/lib/shim/shimx64.efi.signed" in str(err.value)
    assert "shim-signed grub-efi-amd64-signed" in err.value.hint and "secure_boot: false" in err.value.hint


def test_chain_files_behind_symlinks_are_resolved_in_the_image(tmp_path, host_grub):
    # Ubuntu: shimx64.efi.signed.latest may be a link; merged /usr: /lib -> usr/lib. A link
    # is resolved inside the image (an absolute target is the image's root, not the host's).
    tree = tmp_path / "tree"
    (tree / "usr/lib/shim").mkdir(parents=True)
    (tree / "usr/lib/shim/shimx64.efi.signed.real").write_bytes(host_grub.read_bytes())
    (tree / "usr/lib/shim/shimx64.efi.signed.latest").symlink_to("shimx64.efi.signed.real")
    (tree / "usr/lib/shim/abs").symlink_to("/usr/lib/shim/shimx64.efi.signed.latest")
    (tree / "lib").symlink_to("usr/lib")
    (tree / "loop").symlink_to("loop")
    sqfs = _squashfs(tmp_path, {})
    assert bootchain.resolve(sqfs, "lib/shim/abs") == "usr/lib/shim/shimx64.efi.signed.real"
    assert bootchain.resolve(sqfs, "usr/lib/shim/../shim/shimx64.efi.signed.latest") == \
        "usr/lib/shim/shimx64.efi.signed.real"
    chain = bootchain.CHAINS["ubuntu"]
    out = bootchain.read_file(sqfs, "lib/shim/shimx64.efi.signed.latest", tmp_path / "shim.efi", chain)
    assert out.read_bytes() == host_grub.read_bytes()
    with pytest.raises(PipelineError, match="too many levels of symbolic links"):
        bootchain.resolve(sqfs, "loop/x")


def test_unsigned_chain_is_refused(tmp_path, host_grub):
    chain = bootchain.CHAINS["debian"]
    sqfs = _squashfs(tmp_path, {p: host_grub for p in (chain.shim, chain.mok_manager, chain.grub)})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PipelineError, match="shimx64.efi.signed in rootfs.squashfs is not signed"):
        bootchain.extract(sqfs, "debian", out)


def test_stubs_are_valid_grub_script(tmp_path):
    need_tools("grub-script-check")
    for stub in (bootchain.stub_config("/etc/cos/grub.cfg", "COS_RECOVERY", "COS_STATE"),
                 bootchain.stub_config("/boot/grub/grub.cfg", "COS_LIVE")):
        (tmp_path / "stub.cfg").write_text(stub)
        run("grub-script-check", tmp_path / "stub.cfg")
        assert "insmod" not in stub


# --- the built flavor: its real signed chain (no QEMU) ---------------------------------

def _mcopy(image: str, inner: str, dest: Path) -> bytes:
    run("mcopy", "-o", "-i", image, f"::{inner}", dest)
    return dest.read_bytes()


def _esp(image: Path) -> str:
    """mtools' address of the ESP in a disk or hybrid ISO: its partition 2."""
    parts = json.loads(run("sfdisk", "--json", image))["partitiontable"]["partitions"]
    return f"{image}@@{parts[1]['start'] * 512}"


@pytest.mark.slow
def test_built_flavor_esps_carry_its_signed_chain(flavor_build, flavor_paths, build_dir, tmp_path):
    inputs = artifacts.boot_inputs(flavor_paths)
    assert inputs.secure_boot == flavor_paths.flavor.distro
    assert bootchain.parse_pe(inputs.kernel.read_bytes(), "vmlinuz").signed  # the distro kernel, signed
    for d in ("disk", "cd"):
        (tmp_path / d).mkdir()
    disk_chain = bootchain.extract(inputs.squashfs, inputs.secure_boot, tmp_path / "disk")
    cd_chain = bootchain.extract(inputs.squashfs, inputs.secure_boot, tmp_path / "cd", cd=True)
    esp = _esp(artifact(flavor_build, build_dir, "raw"))
    for name, src in disk_chain.files.items():
        assert _mcopy(esp, name, tmp_path / "x") == src.read_bytes(), name
    stub = _mcopy(esp, disk_chain.config_path, tmp_path / "stub").decode()
    assert "COS_STATE" in stub and "configfile ($root)/etc/cos/grub.cfg" in stub
    assert _mcopy(esp, bootchain.STUB_ESP, tmp_path / "stub2").decode() == stub
    iso_esp = _esp(artifact(flavor_build, build_dir, "iso"))  # the ISO's appended ESP: shim + CD GRUB
    for name, src in cd_chain.files.items():
        assert _mcopy(iso_esp, name, tmp_path / "y") == src.read_bytes(), name
    assert "COS_LIVE" in _mcopy(iso_esp, cd_chain.config_path, tmp_path / "s").decode()


def test_secure_boot_firmware_command_line():
    """uefi-sb: the SMM OVMF with Microsoft's keys, SMM on, secured flash, S3 off."""
    from pipeline import vm
    cmd = vm.qemu_command(vm.Machine([vm.Drive(Path("disk.raw"))], firmware="uefi-sb"), Path("vars.fd"))
    joined = " ".join(cmd)
    assert "-machine q35,smm=on" in joined
    assert "-global driver=cfi.pflash01,property=secure,value=on" in joined
    assert "-global ICH9-LPC.disable_s3=1" in joined
    assert f"readonly=on,file={vm.OVMF_SB_CODE}" in joined and vm.OVMF_SB_CODE.name == "OVMF_CODE_4M.ms.fd"
    assert vm.ovmf("uefi-sb") == (vm.OVMF_SB_CODE, vm.OVMF_SB_VARS)
    plain = " ".join(vm.qemu_command(vm.Machine([vm.Drive(Path("disk.raw"))]), Path("vars.fd")))
    assert "smm=on" not in plain and "secure,value=on" not in plain


def test_secure_boot_is_on_by_default_and_strict():
    from pydantic import ValidationError

    from pipeline.config import BootOptions
    assert BootOptions(live_label="COS_LIVE", cmdline="quiet").secure_boot is True
    assert BootOptions(live_label="COS_LIVE", cmdline="quiet", secure_boot=False).secure_boot is False
    with pytest.raises(ValidationError):
        BootOptions(live_label="COS_LIVE", cmdline="quiet", secure_boot="yes")  # type: ignore[arg-type]


def test_opt_out_builds_todays_unsigned_esp(tmp_path):
    """boot.secure_boot false: BootInputs.secure_boot None, the ESP holds the host-made
    GRUB as BOOTX64.EFI and the stub, no shim."""
    from pipeline import disk
    from pipeline.config import DiskLayout, Partition
    from tests.synthetic import make_inputs
    need_tools("grub-mkimage", "mksquashfs", "rdsquashfs")
    inputs = make_inputs(tmp_path)
    assert inputs.secure_boot is None
    layout = DiskLayout(bios_boot_mib=1, efi=Partition(label="COS_GRUB", size_mib=8),
                        oem=Partition(label="COS_OEM", size_mib=8), recovery=Partition(label="COS_RECOVERY", size_mib=24),
                        state=Partition(label="COS_STATE", size_mib=100), persistent=Partition(label="COS_PERSISTENT", size_mib=0))
    files = disk.esp_files(inputs, layout, tmp_path)
    assert sorted(files) == [bootchain.SHIM_ESP, bootchain.STUB_ESP]
    assert b"configfile ($root)/EFI/BOOT/grub.cfg" in files[bootchain.SHIM_ESP].read_bytes()
    assert not bootchain.parse_pe(files[bootchain.SHIM_ESP].read_bytes(), "BOOTX64.EFI").signed
