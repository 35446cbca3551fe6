"""The cOS runtime, end to end in QEMU (TCG) on the red raw disk: a vanilla disk with
the issue's user-data on a NoCloud cidata ISO lays itself out, deploys, reboots and comes
up as an immutable system.

ONE deployed disk is shared by the tests (session fixtures, boots in this order):
  1. vanilla disk, recovery: the rootfs stage's `layout` adds COS_STATE (8192 MiB) and
     COS_PERSISTENT (the rest), the network stage runs cos-deploy && reboots (QEMU runs
     with -no-reboot: it exits, and is started again on the same disk);
  2. the `cos` entry: active, read-only /, overlays, persistent paths, the users step's
     ssh key, the broken step logged while the boot reached multi-user;
  3. files written to /etc, /home, /usr/local, next_entry=fallback set in COS_OEM's
     grubenv from the running system, reboot: the fallback entry boots passive.img, and
     only the /etc file is gone.
A second disk copy shows a cos-deploy killed midway (kill -9): recovery still boots and
the next cos-deploy succeeds. The time from the first power-on of the vanilla disk to
the login prompt of the deployed system is printed (README: "Measured")."""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.qemu import VM, Drive, cidata_iso, grown_copy
from tests.test_boot import artifact, require

pytestmark = [pytest.mark.slow, pytest.mark.boot]

DISK_SIZE = "24G"
STATE_MIB = 8192
BOOT_TIMEOUT = 400      # s to a login prompt under TCG
DEPLOY_TIMEOUT = 1500   # s for the first boot: recovery, layout, cos-deploy, reboot
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDyvS5WbEhG4cQ3l0uJbVnQ1hC1UG7y6f1mM4wqQ8x2d cos-test"
BROKEN_STEP = "Deliberately broken step"

DEPLOY_USER_DATA = f"""\
name: "Default deployment"
stages:
  rootfs.after:
    - name: "Repart image"
      layout:
        device: {{label: COS_RECOVERY}}
        add_partitions:
          - {{fsLabel: COS_STATE, size: {STATE_MIB}, pLabel: state}}
          - {{fsLabel: COS_PERSISTENT, pLabel: persistent}}
  initramfs:
    - if: '[ -f "/run/cos/recovery_mode" ]'
      name: "Let sshd wait for the deployment"
      files:
        - path: /etc/systemd/system/sshd.service.d/override.conf
          content: |
            [Unit]
            After=cos-setup-network.service
  boot:
    - name: "Test user"
      users:
        cosuser:
          passwd: "cosuser"
          groups: [users]
          ssh_authorized_keys:
            - "{SSH_KEY}"
    - name: "{BROKEN_STEP}"
      commands:
        - "exit 7"
    - name: "After the broken step"
      files:
        - path: /run/cos/after-broken-step
          content: "ran"
  network:
    - if: '[ -f "/run/cos/recovery_mode" ]'
      name: "Deploy"
      commands:
        - cos-deploy --no-verify --no-cosign && shutdown -r now
"""

# The killed-deploy disk lays out the partitions but deploys only by hand.
LAYOUT_ONLY_USER_DATA = DEPLOY_USER_DATA.split("  initramfs:")[0]


@dataclass
class Disk:
    path: Path
    cidata: Path

    def vm(self, name: str) -> VM:
        return VM(Drive(self.path, snapshot=False), name=name, extra=[Drive(self.cidata, media="cdrom")])


def make_disk(raw: Path, work: Path, user_data: str) -> Disk:
    """A sparse copy of the vanilla disk grown to DISK_SIZE, and its NoCloud seed."""
    work.mkdir(parents=True, exist_ok=True)
    return Disk(grown_copy(raw, work / "disk.raw", DISK_SIZE), cidata_iso(work, user_data))


def boot(disk: Disk, name: str) -> VM:
    return disk.vm(name).boot(BOOT_TIMEOUT)


def reboot(vm: VM, disk: Disk, name: str) -> VM:
    """`reboot` in the guest ends QEMU (-no-reboot); start it again on the same disk."""
    vm.send("systemctl reboot")
    try:
        assert vm.proc
        vm.proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        raise vm.fail("did not go down within 180 s") from None
    finally:
        vm.stop()
    return boot(disk, name)


def check(vm: VM, ok: bool, what: str) -> None:
    if not ok:
        raise vm.fail(what)


@dataclass
class Installed:
    disk: Disk
    first_boot: VM          # the recovery boot that deployed (stopped)
    vm: VM                  # the deployed system, logged in
    seconds_to_login: float


@pytest.fixture(scope="session")
def installed(flavor_build, build_dir, tmp_path_factory):
    """Boots 1 and 2: the vanilla disk deploys itself; the deployed system is logged in."""
    require("uefi")
    disk = make_disk(artifact(flavor_build, build_dir, "raw"), tmp_path_factory.mktemp("deployed"),
                     DEPLOY_USER_DATA)
    first = disk.vm("deploy-boot1").start()
    try:
        first.expect(r"cos-setup-network|Deploy", DEPLOY_TIMEOUT)  # the network stage started
        assert first.proc
        first.proc.wait(timeout=DEPLOY_TIMEOUT)  # cos-deploy && shutdown -r now: QEMU exits
    except subprocess.TimeoutExpired:
        raise first.fail(f"the first boot did not deploy and reboot within {DEPLOY_TIMEOUT} s") from None
    finally:
        first.stop()
    first_seconds = time.monotonic() - first.started
    print(f"[deploy-boot1] recovery boot, layout and cos-deploy: {first_seconds:.0f} s", flush=True)
    vm = boot(disk, "deploy-boot2")
    assert vm.login_seconds is not None
    total = first_seconds + vm.login_seconds
    print(f"\nMEASURED: vanilla disk power-on -> login prompt of the deployed system: {total:.0f} s "
          f"(recovery + layout + deploy {first_seconds:.0f} s, then {vm.login_seconds:.0f} s to login) "
          f"under TCG", flush=True)
    holder = Installed(disk, first, vm, total)
    yield holder
    holder.vm.stop()


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


@pytest.fixture(scope="session")
def fallback(installed):
    """Boot 3: files written on the active system, next_entry=fallback, reboot."""
    vm = installed.vm
    vm.run("echo etc > /etc/cos-test-etc && echo home > /home/cos-test-home"
           " && echo local > /usr/local/cos-test-local && sync")
    vm.run("grub-editenv /oem/grubenv set next_entry=fallback && sync")
    installed.vm = reboot(vm, installed.disk, "deploy-boot3-fallback")
    return installed.vm


def test_fallback_entry_boots_the_passive_image(fallback):
    vm = fallback
    cmdline = vm.run("cat /proc/cmdline")
    check(vm, "cos-img/filename=/cOS/passive.img" in cmdline and "cos.mode=passive" in cmdline, cmdline)
    vm.run("test -e /run/cos/passive_mode")
    check(vm, vm.run("blkid -s LABEL -o value $(findmnt -n -o SOURCE /)") == "COS_PASSIVE", "/ is not COS_PASSIVE")
    out = vm.run("touch /usr/x 2>&1; echo rc=$?", check=False)
    check(vm, "rc=0" not in out, "passive / is writable")


def test_etc_is_volatile_home_and_usr_local_persist(fallback):
    vm = fallback
    vm.run("test ! -e /etc/cos-test-etc")
    check(vm, vm.run("cat /home/cos-test-home") == "home", "/home did not persist")
    check(vm, vm.run("cat /usr/local/cos-test-local") == "local", "/usr/local did not persist")
    vm.run("test -d /usr/local/.state/home.bind && test -d /usr/local/.state/etc-ssh.bind")


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

