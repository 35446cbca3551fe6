"""The deployed red disk shared by the QEMU runtime tests (test_runtime_boot, then
test_runtime_upgrade): session fixtures, registered once in tests/conftest.py so every
test file gets the same disk and VM (boots 1-2 of test_runtime_boot's docstring)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.qemu import VM, Drive, cidata_iso, grown_copy
from tests.test_boot import artifact, require

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
    vm.wait_exit(180, "did not go down")
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
    except BaseException:
        first.stop()
        raise
    first.wait_exit(DEPLOY_TIMEOUT, "the first boot did not deploy and reboot")  # cos-deploy && shutdown -r now
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
