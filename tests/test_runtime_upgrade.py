"""The seed's demo, whole, in QEMU (TCG) on the deployed disk of test_runtime_boot (the
session fixture `installed`, tests/runtime_vm.py: its tests run first, then these):

  1. a user Dockerfile `FROM` our red image installs `hello` and changes os-release; the
     image goes into a registry v2 server on the host's 127.0.0.1 (Debian's docker-registry);
  2. the deployed system boots with restricted user networking and ONE guestfwd
     (10.0.2.100:5000 -> that registry, marked insecure in /etc/containers/registries.conf),
     runs `cos-upgrade --no-verify --reboot -d <that image>`;
  3. after the reboot: `hello` runs, os-release is the new one, the boot was a trial that
     cos-boot-assess marked good; the channel configured -> `cos-upgrade` is already up to
     date; passive.img holds the old system and the fallback entry boots it.
The pull / unpack / write split of the in-guest upgrade is printed (README: "Measured").

Then the rollback, on the same disk (no new deployment): a user image FROM the upgraded one
whose boot fails (a typo in an /etc/fstab label: local-fs.target fails, systemd goes to
emergency mode, as a real broken image does); `cos-upgrade --reboot -d <it>` fetches only
its one new layer (the layer cache, measured); the trial boot restarts by itself
(cos-trial-failed.service); the next start boots passive with nobody at the menu,
/run/cos/, the journal and cOS/failed-images.json name the image, and the channel with
that image as newest does not pick it again."""
from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.qemu import VM, Drive, GuestForward, Network
from tests.runtime_vm import BOOT_TIMEOUT, Installed, check
from tests.servers.registry import Registry, start_registry, stop

pytestmark = [pytest.mark.slow, pytest.mark.boot]

GUEST_IP, GUEST_PORT = "10.0.2.100", 5000
GUEST_REGISTRY = f"{GUEST_IP}:{GUEST_PORT}"
REPO_NAME = "cos/red-user"
TAG = "red-0.2.0-user-x86_64"
UPGRADE_TIMEOUT = 1800    # s: pull + unpack + write of ~750 MiB under TCG, then the reboot
NEW_NAME = "cOS red, upgraded by a user Dockerfile"

USER_DOCKERFILE = """\
FROM {base}
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends hello \\
 && rm -rf /var/lib/apt/lists/* \\
 && sed -i --follow-symlinks 's/^PRETTY_NAME=.*/PRETTY_NAME="{name}"/' /etc/os-release
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("upgrade-registry"))
    yield reg
    stop(reg.proc)


@pytest.fixture(scope="module")
def user_image(flavor_build: dict, registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Built with the real docker (the mirror reached with --network=host), pushed by docker."""
    ctx = tmp_path_factory.mktemp("user-image")
    (ctx / "Dockerfile").write_text(USER_DOCKERFILE.format(base=flavor_build["image"]["reference"], name=NEW_NAME))
    tag = f"{registry.address}/{REPO_NAME}:{TAG}"
    start = time.monotonic()
    for cmd in (["docker", "build", "--network=host", "-t", tag, str(ctx)], ["docker", "push", tag]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    print(f"user image built and pushed in {time.monotonic() - start:.0f} s", flush=True)
    return f"{GUEST_REGISTRY}/{REPO_NAME}:{TAG}"


def networked(installed: Installed, registry: Registry, name: str) -> VM:
    port = int(registry.address.rsplit(":", 1)[1])
    net = Network(guestfwd=[GuestForward(GUEST_IP, GUEST_PORT, port)])   # the only way out of the guest
    vm = VM(Drive(installed.disk.path, snapshot=False), name=name, network=net,
            extra=[Drive(installed.disk.cidata, media="cdrom")])
    return vm.boot(BOOT_TIMEOUT)


def insecure(vm: VM) -> None:
    """/etc is volatile: after every boot the test marks the registry insecure again."""
    vm.run(f"printf '[[registry]]\\nlocation = \"{GUEST_REGISTRY}\"\\ninsecure = true\\n'"
           " > /etc/containers/registries.conf")


@pytest.fixture(scope="module")
def upgraded(installed: Installed, registry: Registry, user_image: str) -> Iterator[VM]:
    try:   # whatever test_runtime_boot left running (passive): the disk is ours now
        installed.vm.poweroff()
    except AssertionError:
        pass
    installed.vm.stop()
    vm = networked(installed, registry, "upgrade-boot1")
    try:
        vm.run("test -e /run/cos/active_mode")
        insecure(vm)
        start = time.monotonic()
        vm.send(f"cos-upgrade --no-verify --reboot -d {user_image} 2>&1 | tee /usr/local/upgrade.log")
        m = vm.expect(r"upgraded: active.img is .*?\((pull [^)]*)\)", UPGRADE_TIMEOUT, fail_on=r"cos-upgrade: error")
        print(f"\nMEASURED: in-guest cos-upgrade under TCG: {m.group(1)}; total {time.monotonic() - start:.0f} s",
              flush=True)
        assert vm.proc
        vm.proc.wait(timeout=300)   # --reboot: QEMU exits (-no-reboot)
    except subprocess.TimeoutExpired:
        raise vm.fail("the upgraded system did not reboot within 300 s") from None
    finally:
        vm.stop()
    vm = networked(installed, registry, "upgrade-boot2")
    installed.vm = vm
    yield vm
    vm.stop()


def test_the_user_image_runs_after_the_upgrade(upgraded: VM) -> None:
    vm = upgraded
    check(vm, vm.run("hello") == "Hello, world!", "the package of the user image is missing")
    check(vm, NEW_NAME in vm.run("cat /etc/os-release"), "os-release is not the new one")
    cmdline = vm.run("cat /proc/cmdline")
    check(vm, "cos.mode=active" in cmdline and "systemd.crash_reboot=1" in cmdline, f"not a trial boot: {cmdline}")
    vm.run("for i in $(seq 120); do systemctl is-active -q cos-boot-assess && break; sleep 1; done;"
           " systemctl is-active cos-boot-assess", timeout=180)
    env = vm.run("grub-editenv /oem/grubenv list")
    check(vm, "cos_trial=1" not in env, f"the good boot was not marked: {env}")


def test_channel_says_already_up_to_date(upgraded: VM) -> None:
    vm = upgraded
    insecure(vm)
    vm.run(f"printf 'repository: {GUEST_REGISTRY}/{REPO_NAME}\\ntags: \"red-*\"\\n' > /etc/cos/upgrade.yaml")
    out = vm.run("cos-upgrade --reboot 2>&1", timeout=300)
    check(vm, "already up to date" in out, out)


def test_passive_holds_the_old_system_and_the_fallback_boots_it(upgraded: VM, installed: Installed,
                                                                registry: Registry) -> None:
    vm = upgraded
    img = "/run/initramfs/cos-state/cOS/passive.img"
    old = vm.run(f"debugfs -R 'cat /etc/os-release' {img} 2>/dev/null; debugfs -R 'cat /usr/lib/os-release' {img}"
                 " 2>/dev/null")
    check(vm, "PRETTY_NAME" in old and NEW_NAME not in old, f"passive.img: {old}")
    vm.run("grub-editenv /oem/grubenv set next_entry=fallback && sync")
    vm.send("systemctl reboot")
    assert vm.proc
    vm.proc.wait(timeout=180)
    vm.stop()
    vm = networked(installed, registry, "upgrade-boot3-fallback")
    installed.vm = vm
    check(vm, "cos.mode=passive" in vm.run("cat /proc/cmdline"), "the fallback entry did not boot passive")
    out = vm.run("command -v hello; true")
    check(vm, out == "", f"passive has the new package: {out}")
    check(vm, NEW_NAME not in vm.run("cat /etc/os-release"), "passive is not the old system")



# ---- a broken image rolls back by itself ----------------------------------------------------

BROKEN_REPO = "cos/red-broken"
BROKEN_TAG = "red-0.3.0-broken-x86_64"
# A data disk's label mistyped: the device never appears, the mount fails after 5 s, and
# local-fs.target sends systemd to emergency mode (where a plain boot would wait forever).
BROKEN_DOCKERFILE = """\
FROM {base}
RUN printf 'LABEL=COS_APPDTA /srv/appdata ext4 defaults,x-systemd.device-timeout=5s 0 2\\n' >> /etc/fstab
"""
# its echo on the console, or systemd's status line for it
TRIAL_FAILED = r"cos-trial-failed: the trial boot of the new active|cOS boot assessment: this trial boot"


@pytest.fixture(scope="module")
def broken_image(user_image: str, registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(the guest's reference, its manifest digest): one small layer on top of user_image."""
    ctx = tmp_path_factory.mktemp("broken-image")
    (ctx / "Dockerfile").write_text(BROKEN_DOCKERFILE.format(base=f"{registry.address}/{REPO_NAME}:{TAG}"))
    tag = f"{registry.address}/{BROKEN_REPO}:{BROKEN_TAG}"
    out = ""
    for cmd in (["docker", "build", "-t", tag, str(ctx)], ["docker", "push", tag]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        out = proc.stdout
    m = re.search(r"digest: (sha256:[0-9a-f]{64})", out)
    assert m, f"docker push printed no digest:\n{out}"
    return f"{GUEST_REGISTRY}/{BROKEN_REPO}:{BROKEN_TAG}", m.group(1)


@pytest.fixture(scope="module")
def rolled_back(upgraded: VM, installed: Installed, registry: Registry, broken_image: tuple[str, str]) -> VM:
    """The machine as the other tests left it (active or passive) upgrades to the broken
    image and reboots; the trial boot must restart by itself, the next start must be passive."""
    vm, (image, _) = installed.vm, broken_image
    start = time.monotonic()
    insecure(vm)
    running = vm.run("grep ^PRETTY_NAME= /etc/os-release")
    vm.send(f"cos-upgrade --no-verify --reboot -d {image} 2>&1 | tee /usr/local/upgrade-broken.log")
    fetched = vm.expect(r"fetched \d+ blob\(s\), [\d.]+ MiB \((\d+) bytes\); (\d+) blob\(s\), ([\d.]+) MiB reused",
                        UPGRADE_TIMEOUT, fail_on=r"cos-upgrade: error")
    print(f"\nMEASURED: re-upgrade to an image one layer apart: {fetched.group(0)}", flush=True)
    check(vm, int(fetched.group(1)) < 1024 * 1024 and int(fetched.group(2)) > 0,
          f"the layers of the previous upgrade were not reused: {fetched.group(0)}")
    vm.expect(r"upgraded: active.img is ", UPGRADE_TIMEOUT, fail_on=r"cos-upgrade: error")
    try:
        assert vm.proc
        vm.proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        raise vm.fail("did not reboot after the upgrade within 300 s") from None
    finally:
        vm.stop()
    trial = VM(Drive(installed.disk.path, snapshot=False), name="rollback-boot1-trial",
               extra=[Drive(installed.disk.cidata, media="cdrom")]).start()
    try:   # nobody touches it: it must restart by itself (QEMU exits: -no-reboot)
        assert trial.proc
        trial.proc.wait(timeout=BOOT_TIMEOUT + 180)
        check(trial, bool(re.search(TRIAL_FAILED, trial.text())), "the trial restarted, but not by cos-trial-failed")
    except subprocess.TimeoutExpired:
        raise trial.fail(f"the failed trial boot did not restart by itself within {BOOT_TIMEOUT + 180} s") from None
    finally:
        trial.stop()
    print(f"[rollback-boot1-trial] failed and restarted by itself after {time.monotonic() - trial.started:.0f} s",
          flush=True)
    vm = networked(installed, registry, "rollback-boot2-fallback")
    installed.vm = vm
    check(vm, vm.run("grep ^PRETTY_NAME= /etc/os-release") == running, "the fallback is not the previous system")
    print(f"rollback: upgrade, failed trial, fallback boot: {time.monotonic() - start:.0f} s", flush=True)
    return vm


def test_a_broken_image_rolls_back_to_passive_by_itself(rolled_back: VM, broken_image: tuple[str, str]) -> None:
    vm, (image, digest) = rolled_back, broken_image
    cmdline = vm.run("cat /proc/cmdline")
    check(vm, "cos.mode=passive" in cmdline and "cos.rollback" in cmdline, f"not a rollback boot: {cmdline}")
    vm.run("for i in $(seq 120); do systemctl is-active -q cos-boot-assess && break; sleep 1; done;"
           " systemctl is-active cos-boot-assess", timeout=180)
    note = vm.run("cat /run/cos/upgrade_rolled_back")
    check(vm, image in note and digest in note, f"/run/cos/upgrade_rolled_back: {note}")
    journal = vm.run("journalctl -b -u cos-boot-assess --no-pager")
    check(vm, f"the upgrade to {image} ({digest}) was rolled back" in journal, journal)
    failed = vm.run("cat /run/initramfs/cos-state/cOS/failed-images.json")
    check(vm, digest in failed, f"failed-images.json: {failed}")
    env = vm.run("grub-editenv /oem/grubenv list")
    check(vm, "saved_entry=fallback" in env and "cos_trial=1" not in env, f"grubenv: {env}")


def test_the_channel_does_not_pick_the_failed_image_again(rolled_back: VM) -> None:
    vm = rolled_back
    insecure(vm)
    vm.run(f"printf 'repository: {GUEST_REGISTRY}/{BROKEN_REPO}\\ntags: \"red-*\"\\n' > /etc/cos/upgrade.yaml")
    out = vm.run("cos-upgrade --reboot 2>&1", timeout=300)
    check(vm, f"skipping {GUEST_REGISTRY}/{BROKEN_REPO}:{BROKEN_TAG}" in out and "failed to boot before" in out, out)
    check(vm, "nothing to upgrade to" in out, out)
    check(vm, "cos.rollback" in vm.run("cat /proc/cmdline"), "the machine rebooted")   # still this boot
