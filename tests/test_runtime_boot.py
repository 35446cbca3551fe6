"""The cOS runtime, end to end in QEMU (TCG) on the red raw disk: a vanilla disk with
the issue's user-data on a NoCloud cidata ISO lays itself out, deploys, reboots and comes
up as an immutable system.

ONE deployed disk is shared by the tests (session fixtures, boots in this order):
  1. vanilla disk, recovery: the rootfs stage's `layout` adds COS_STATE (8192 MiB) and
     COS_PERSISTENT (the rest), the network stage runs cos-deploy && reboots (QEMU runs
     with -no-reboot: it exits, and is started again on the same disk);
  2. the `cos` entry: active, read-only /, overlays, persistent paths, the users step's
     ssh key, the broken step logged while the boot reached multi-user.
The fallback entry (passive.img; /etc volatile, /home and /usr/local persistent across
the switch) is booted once, after the upgrade: tests/test_runtime_upgrade.py.
A second disk copy shows a cos-deploy killed midway (kill -9): recovery still boots and
the next cos-deploy succeeds. The time from the first power-on of the vanilla disk to
the login prompt of the deployed system is printed (README: "Measured")."""
from __future__ import annotations

import pytest

from tests.runtime_vm import (  # its fixture `installed` is registered in tests/conftest.py
    BROKEN_STEP,
    LAYOUT_ONLY_USER_DATA,
    SSH_KEY,
    STATE_MIB,
    boot,
    check,
    make_disk,
    reboot,
)
from tests.test_boot import artifact, require

pytestmark = [pytest.mark.slow, pytest.mark.boot]

def test_first_boot_laid_out_state_and_persistent(installed):
    vm = installed.vm
    vm.run("udevadm settle --timeout=60")
    rows = [ln.split() for ln in vm.run("lsblk -b -n -r -o LABEL,PARTLABEL,SIZE /dev/vda").splitlines()]
    by_label = {r[0]: r for r in rows if len(r) == 3}
    check(vm, "COS_STATE" in by_label and "COS_PERSISTENT" in by_label, f"lsblk: {rows}")
    check(vm, by_label["COS_STATE"][1:] == ["state", str(STATE_MIB * 1024 * 1024)], f"COS_STATE: {rows}")
    persistent = int(by_label["COS_PERSISTENT"][2])
    check(vm, by_label["COS_PERSISTENT"][1] == "persistent" and persistent > 10 * 1024 ** 3,
          f"COS_PERSISTENT is not the rest of the 24 GiB disk: {rows}")
    files = vm.run("ls /run/initramfs/cos-state/cOS")
    check(vm, {"active.img", "passive.img"} <= set(files.split()), files)
    check(vm, "transition.img" not in files, files)


def test_deployed_system_boots_the_active_image_read_only(installed):
    vm = installed.vm
    cmdline = vm.run("cat /proc/cmdline")
    check(vm, "cos-img/filename=/cOS/active.img" in cmdline and "cos.mode=active" in cmdline, cmdline)
    vm.run("test -e /run/cos/active_mode && test ! -e /run/cos/recovery_mode")
    check(vm, vm.run("findmnt -n -o SOURCE,FSTYPE,OPTIONS /").split()[1] == "ext4", "/ is not the ext4 image")
    check(vm, "ro" in vm.run("findmnt -n -o OPTIONS /").split(","), "/ is not mounted read-only")
    check(vm, vm.run("blkid -s LABEL -o value $(findmnt -n -o SOURCE /)") == "COS_ACTIVE", "/ is not COS_ACTIVE")
    out = vm.run("touch /usr/x 2>&1; echo rc=$?", check=False)
    check(vm, "rc=0" not in out and "Read-only file system" in out, f"touch /usr/x: {out}")
    for path in ("/etc", "/root", "/home", "/opt", "/srv", "/var"):
        check(vm, vm.run(f"findmnt -n -o FSTYPE --target {path} | head -1") in ("overlay", "ext4"), path)
    vm.run("touch /etc/writable /var/writable")  # overlays make them writable
    check(vm, vm.run("findmnt -n -o FSTYPE /etc") == "overlay", "/etc is not an overlay")
    check(vm, vm.run("findmnt -n -o SOURCE /oem").endswith("COS_OEM") or "vda3" in vm.run("findmnt -n -o SOURCE /oem"),
          "COS_OEM is not at /oem")
    src = vm.run("findmnt -n -o SOURCE /usr/local")
    check(vm, src == vm.run("blkid -L COS_PERSISTENT"), f"/usr/local is {src}, not COS_PERSISTENT")


def test_cloud_config_applied_and_broken_step_does_not_stop_the_boot(installed):
    vm = installed.vm
    # the login prompt comes before the last units of multi-user (wait-online without a NIC)
    vm.run("timeout 300 sh -c 'until systemctl -q is-active multi-user.target; do sleep 2; done'", timeout=330)
    logs = vm.run(f"grep -l '{BROKEN_STEP}' /run/cos/setup-*.log")
    check(vm, "/run/cos/setup-boot.log" in logs.split(), f"broken step not logged: {logs}")
    log = vm.run("cat /run/cos/setup-boot.log")
    check(vm, "exit" in log.lower() or "7" in log, f"no reason in the log:\n{log}")
    vm.run("test \"$(cat /run/cos/after-broken-step)\" = ran")  # the steps after it still ran
    check(vm, vm.run("systemctl is-failed cos-setup-boot.service", check=False) == "failed",
          "the stage with a broken step must exit non-zero")
    keys = vm.run("cat /home/cosuser/.ssh/authorized_keys")
    check(vm, SSH_KEY in keys, f"authorized_keys: {keys}")
    check(vm, vm.run("hostname") == "cos", "default hostname from /system/oem not applied")


# ---- a cos-deploy killed midway ----

@pytest.fixture(scope="session")
def laid_out(flavor_build, build_dir, tmp_path_factory):
    require("uefi")
    disk = make_disk(artifact(flavor_build, build_dir, "raw"), tmp_path_factory.mktemp("killed"),
                     LAYOUT_ONLY_USER_DATA)
    return disk


def test_killed_deploy_leaves_recovery_bootable_and_redeploy_succeeds(laid_out):
    vm = boot(laid_out, "killed-boot1")
    try:
        vm.run("test -e /run/cos/recovery_mode && blkid -L COS_STATE")
        # start a deploy, kill it -9 once it is writing to COS_STATE
        vm.run("(cos-deploy --no-verify --no-cosign > /run/deploy1.log 2>&1 &) ; true")
        vm.run("for i in $(seq 600); do ls /run/cos/state/cOS/*.img >/dev/null 2>&1 && break; sleep 0.5; done;"
               " ls -la /run/cos/state/cOS/", timeout=400)
        vm.run("sleep 3; pkill -9 -f runtime.install.cli; pkill -9 -x mkfs.ext4; pkill -9 -x cp; true")
        listing = vm.run("ls /run/cos/state/cOS/ 2>&1; true")
        check(vm, "active.img" not in listing.split(), f"a killed deploy left an active.img: {listing}")
        vm = reboot(vm, laid_out, "killed-boot2")
        vm.run("test -e /run/cos/recovery_mode")  # GRUB fell back to recovery
        out = vm.run("cos-deploy --no-verify --no-cosign 2>&1", timeout=1200)
        # cos-deploy unmounts COS_STATE when it is done: look at it read-only
        vm.run("mkdir -p /run/st && mount -o ro LABEL=COS_STATE /run/st")
        listing = vm.run("ls /run/st/cOS/")
        check(vm, {"active.img", "passive.img"} <= set(listing.split()) and "transition.img" not in listing,
              f"{out}\n{listing}")
        check(vm, vm.run("blkid -s LABEL -o value /run/st/cOS/active.img") == "COS_ACTIVE", "label")
        check(vm, "next_entry=cos" in vm.run("grub-editenv /oem/grubenv list"), "next boot is not cos")
        vm.poweroff()
    finally:
        vm.stop()

