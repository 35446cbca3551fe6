"""The seed's demo, whole, in QEMU (TCG) on the deployed disk of test_runtime_boot (the
session fixture `installed`, tests/runtime_vm.py: its tests run first, then these):

  1. a user Dockerfile `FROM` our red image installs `hello` and changes os-release; the
     image goes into a registry v2 server on the host's 127.0.0.1 (Debian's docker-registry);
  2. the deployed system boots with restricted user networking and ONE guestfwd
     (10.0.2.100:5000 -> that registry, marked insecure in /etc/containers/registries.conf),
     runs `cos-upgrade --no-verify --reboot -d <that image>`;
  3. after the reboot: `hello` runs, os-release is the new one, the boot was a trial that
     cos-boot-assess marked good; the channel configured -> `cos-upgrade` is already up to
     date; passive.img holds the old system and the fallback entry boots it, with /etc
     volatile and /home, /usr/local persistent across the switch (files written on active).
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
from tests.runtime_vm import BOOT_TIMEOUT, DEPLOY_TIMEOUT, Installed, check
from tests.servers.registry import Registry, start_registry, stop
from tests.synthetic import GRUB_PACKAGE

pytestmark = [pytest.mark.slow, pytest.mark.boot]

GUEST_IP, GUEST_PORT = "10.0.2.100", 5000
GUEST_REGISTRY = f"{GUEST_IP}:{GUEST_PORT}"
REPO_NAME = "cos/red-user"
TAG = "red-0.2.0-user-x86_64"
UPGRADE_TIMEOUT = 1800    # s: pull + unpack + write of ~750 MiB under TCG, then the reboot
NEW_NAME = "cOS red, upgraded by a user Dockerfile"
BASE_TAG = "cos-test/upgrade-base:session"

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
    # FROM the image this session built, by its id: test_incremental (in the other pytest
    # process of ./dev test) rebuilds the flavor's tag for a while
    subprocess.run(["docker", "tag", flavor_build["image"]["id"], BASE_TAG], check=True, capture_output=True)
    (ctx / "Dockerfile").write_text(USER_DOCKERFILE.format(base=BASE_TAG, name=NEW_NAME))
    tag = f"{registry.address}/{REPO_NAME}:{TAG}"
    start = time.monotonic()
    for cmd in (["docker", "build", "--network=host", "-t", tag, str(ctx)], ["docker", "push", tag]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    print(f"user image built and pushed in {time.monotonic() - start:.0f} s", flush=True)
    return f"{GUEST_REGISTRY}/{REPO_NAME}:{TAG}"


AUTH_IP = "10.0.2.101"                 # a second registry, one that needs credentials
AUTH_REGISTRY = f"{AUTH_IP}:{GUEST_PORT}"
STATE = "/run/initramfs/cos-state"
PGID = "/run/cos-test-upgrade.pgid"


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("upgrade-auth-registry"), auth=True)
    yield reg
    stop(reg.proc)


def networked(installed: Installed, registry: Registry, auth_registry: Registry, name: str) -> VM:
    """The two registries are the only ways out of the guest (restrict=on, one guestfwd each)."""
    net = Network(guestfwd=[GuestForward(GUEST_IP, GUEST_PORT, registry.port),
                            GuestForward(AUTH_IP, GUEST_PORT, auth_registry.port)])
    vm = VM(Drive(installed.disk.path, snapshot=False), name=name, network=net,
            extra=[Drive(installed.disk.cidata, media="cdrom")])
    return vm.boot(BOOT_TIMEOUT)


def insecure(vm: VM) -> None:
    """/etc is volatile: after every boot the test marks the registries insecure again."""
    conf = "".join(f'[[registry]]\\nlocation = "{r}"\\ninsecure = true\\n' for r in (GUEST_REGISTRY, AUTH_REGISTRY))
    vm.run(f"printf '{conf}' > /etc/containers/registries.conf")


def state_snapshot(vm: VM) -> str:
    """What an interrupted or refused upgrade must leave as it was: COS_STATE's cOS/ (names,
    sizes, mtimes, the records' contents) and GRUB's grubenv. Not `..`: COS_STATE's root is
    where the space test puts its filler."""
    return vm.run(f"cd {STATE}/cOS && ls -la --time-style=+%s . | grep -v ' [.][.]$' && sha256sum *.json; cd /;"
                  " grub-editenv /oem/grubenv list")


def start_upgrade(vm: VM, image: str, log: str) -> None:
    """cos-upgrade in the background as its own process group (job control), so that
    kill -9 -PGID takes umoci / cp with it, as a power cut would."""
    vm.run(f"set -m; cos-upgrade --no-verify -d {image} </dev/null >{log} 2>&1 & echo $! > {PGID}")


def wait_in_guest(vm: VM, condition: str, timeout: float, what: str) -> None:
    out = vm.run(f"for i in $(seq {int(timeout * 5)}); do {condition} && break; sleep 0.2; done; {condition}"
                 " && echo reached || echo not-reached", timeout=timeout + 60)
    check(vm, out.endswith("reached") and not out.endswith("not-reached"), f"{what}: not within {timeout:.0f} s")


def kill_upgrade(vm: VM, log: str) -> None:
    vm.run(f"kill -9 -- -$(cat {PGID}); sleep 2; ! kill -0 -- -$(cat {PGID}) 2>/dev/null")
    check(vm, "cos-upgrade: error" not in vm.run(f"cat {log}"), "cos-upgrade failed before it was killed")


@pytest.fixture(scope="module")
def upgraded(installed: Installed, registry: Registry, auth_registry: Registry, user_image: str) -> Iterator[VM]:
    """The demo with two kill -9 on the way: during the unpack (COS_STATE must be as it was;
    the re-run goes on), during the swap (the machine must boot; the re-run completes it)."""
    try:   # whatever test_runtime_boot left running (passive): the disk is ours now
        installed.vm.poweroff()
    except AssertionError:
        pass
    installed.vm.stop()
    vm = networked(installed, registry, auth_registry, "upgrade-boot1")
    try:
        vm.run("test -e /run/cos/active_mode")
        insecure(vm)
        before = state_snapshot(vm)
        start = time.monotonic()
        start_upgrade(vm, user_image, "/usr/local/upgrade-1.log")
        wait_in_guest(vm, "grep -q 'unpacking the layers' /usr/local/upgrade-1.log", UPGRADE_TIMEOUT, "no unpack")
        pull_seconds = time.monotonic() - start
        vm.run("sleep 15")   # well inside the unpack (140 s and more under TCG)
        kill_upgrade(vm, "/usr/local/upgrade-1.log")
        check(vm, state_snapshot(vm) == before, "a kill -9 during the unpack changed COS_STATE or grubenv")
        # the re-run (layers cached by the first) goes on; killed once the swap has begun
        start_upgrade(vm, user_image, "/usr/local/upgrade-2.log")
        wait_in_guest(vm, f"test -e {STATE}/cOS/.upgrade-journal", UPGRADE_TIMEOUT, "the swap never began")
        kill_upgrade(vm, "/usr/local/upgrade-2.log")
        split = vm.run("sed -n 's/.*transition.img is complete (\\(.*\\)); swapping/\\1/p' /usr/local/upgrade-2.log")
        print(f"\nMEASURED: in-guest cos-upgrade under TCG: pull {pull_seconds:.0f} s (cold); then, the "
              f"layers cached: {split}", flush=True)
        check(vm, vm.run(f"test -e {STATE}/cOS/.upgrade-journal && echo journal") == "journal",
              "the kill came after the swap had finished")
        vm.send("sync; systemctl reboot")
        vm.wait_exit(180, "did not go down")
        vm = networked(installed, registry, auth_registry, "upgrade-boot2-after-kill")   # it boots
        insecure(vm)
        vm.send(f"cos-upgrade --no-verify --reboot -d {user_image} 2>&1 | tee /usr/local/upgrade-3.log")
        vm.expect(r"completed the interrupted upgrade to ", UPGRADE_TIMEOUT, fail_on=r"cos-upgrade: error")
        vm.wait_exit(300, "the upgraded system did not reboot")   # --reboot: QEMU exits (-no-reboot)
    finally:
        vm.stop()
    vm = networked(installed, registry, auth_registry, "upgrade-boot3")
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


# ---- refusals: one line each, nothing on disk changed -----------------------------------------

NOT_COS, SMALL_COS, PRIVATE = "cos/not-cos:1", "cos/small-cos:1", "cos/private:1"
# what check_cos_image looks for: kernel, initrd, our toolkit (placeholders here), the boot menu (the real one)
SMALL_COS_FILES = ("boot/vmlinuz", "boot/initrd", "usr/lib/cos/python-run", "etc/cos/grub.cfg", "etc/cos/bootargs.cfg")


@pytest.fixture(scope="module")
def small_images(registry: Registry, auth_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> None:
    """FROM scratch (no network): a tree that is no OS, one with cOS's files (tiny, for the
    space check), and the first again in the registry that wants credentials."""
    base = tmp_path_factory.mktemp("small-images")
    for name, files in ((NOT_COS, ("hello.txt",)), (SMALL_COS, SMALL_COS_FILES)):
        ctx = base / name.replace("/", "_")
        for f in files:
            (ctx / "root" / f).parent.mkdir(parents=True, exist_ok=True)
            (ctx / "root" / f).write_text((GRUB_PACKAGE / f).read_text() if f.startswith("etc/cos/") else "x\n")
        (ctx / "Dockerfile").write_text("FROM scratch\nCOPY root/ /\n")
        tag = f"{registry.address}/{name}"
        for cmd in (["docker", "build", "-t", tag, str(ctx)], ["docker", "push", tag]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    proc = subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                           "--dest-creds", f"{auth_registry.user}:{auth_registry.password}",
                           f"docker-daemon:{registry.address}/{NOT_COS}", f"docker://{auth_registry.address}/{PRIVATE}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def refused(vm: VM, image: str, says: str) -> None:
    out = vm.run(f"cos-upgrade --no-verify -d {image} 2>&1; echo rc=$?", timeout=UPGRADE_TIMEOUT)
    errors = [line for line in out.splitlines() if "cos-upgrade: error" in line]
    check(vm, out.endswith("rc=1") and len(errors) == 1 and says in errors[0], f"{image}: expected {says!r}:\n{out}")


def test_refusals_say_one_line_and_change_nothing(upgraded: VM, small_images: None) -> None:
    vm = upgraded
    insecure(vm)
    before = state_snapshot(vm)
    for image, says in ((f"{GUEST_REGISTRY}/{NOT_COS}", "is not a cOS image: it has no /boot/vmlinuz, /boot/initrd"),
                        (f"{GUEST_REGISTRY}/{REPO_NAME}:no-such-tag", "does not exist in the registry"),
                        (f"{AUTH_REGISTRY}/{PRIVATE}", f"the registry needs credentials for {AUTH_REGISTRY}")):
        refused(vm, image, says)
        check(vm, state_snapshot(vm) == before, f"refusing {image} changed COS_STATE or grubenv")
    # too little space: COS_STATE filled up to 64 MiB, less than any image needs (256 MiB headroom)
    filler = f"{STATE}/cos-test-filler"
    vm.run(f"mount -o remount,rw {STATE} && fallocate -l $(( $(df --output=avail -B1 {STATE} | tail -1)"
           f" - 64 * 1024 * 1024 )) {filler} && mount -o remount,ro {STATE}")
    try:
        refused(vm, f"{GUEST_REGISTRY}/{SMALL_COS}", "COS_STATE has ")
    finally:
        vm.run(f"mount -o remount,rw {STATE} && rm -f {filler} && sync && mount -o remount,ro {STATE}")
    check(vm, state_snapshot(vm) == before, "refusing for lack of space changed COS_STATE or grubenv")


def test_passive_img_holds_the_old_system(upgraded: VM) -> None:
    img = f"{STATE}/cOS/passive.img"
    old = upgraded.run(f"debugfs -R 'cat /etc/os-release' {img} 2>/dev/null; debugfs -R 'cat /usr/lib/os-release' {img}"
                       " 2>/dev/null")
    check(upgraded, "PRETTY_NAME" in old and NEW_NAME not in old, f"passive.img: {old}")


@pytest.fixture(scope="module")
def fallen_back(upgraded: VM, installed: Installed, registry: Registry, auth_registry: Registry) -> VM:
    """Files written to /etc, /home and /usr/local on the upgraded active, next_entry=fallback
    set in COS_OEM's grubenv from the running system, reboot: the fallback entry's boot."""
    upgraded.run("echo etc > /etc/cos-test-etc && echo home > /home/cos-test-home"
                 " && echo local > /usr/local/cos-test-local && sync")
    upgraded.run("grub-editenv /oem/grubenv set next_entry=fallback && sync")
    upgraded.send("systemctl reboot")
    upgraded.wait_exit(180, "did not go down")
    vm = networked(installed, registry, auth_registry, "upgrade-boot4-fallback")
    installed.vm = vm
    return vm


def test_the_fallback_entry_boots_passive_the_old_system(fallen_back: VM) -> None:
    vm = fallen_back
    cmdline = vm.run("cat /proc/cmdline")
    check(vm, "cos-img/filename=/cOS/passive.img" in cmdline and "cos.mode=passive" in cmdline, cmdline)
    vm.run("test -e /run/cos/passive_mode")
    check(vm, vm.run("blkid -s LABEL -o value $(findmnt -n -o SOURCE /)") == "COS_PASSIVE", "/ is not COS_PASSIVE")
    out = vm.run("touch /usr/x 2>&1; echo rc=$?", check=False)
    check(vm, "rc=0" not in out, "passive / is writable")
    out = vm.run("command -v hello; true")
    check(vm, out == "", f"passive has the new package: {out}")
    check(vm, NEW_NAME not in vm.run("cat /etc/os-release"), "passive is not the old system")


def test_etc_is_volatile_home_and_usr_local_persist(fallen_back: VM) -> None:
    vm = fallen_back
    vm.run("test ! -e /etc/cos-test-etc")
    check(vm, vm.run("cat /home/cos-test-home") == "home", "/home did not persist")
    check(vm, vm.run("cat /usr/local/cos-test-local") == "local", "/usr/local did not persist")
    vm.run("test -d /usr/local/.state/home.bind && test -d /usr/local/.state/etc-ssh.bind")


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
def rolled_back(upgraded: VM, installed: Installed, registry: Registry, auth_registry: Registry,
                broken_image: tuple[str, str]) -> VM:
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
    vm.wait_exit(300, "did not reboot after the upgrade")
    trial = VM(Drive(installed.disk.path, snapshot=False), name="rollback-boot1-trial",
               extra=[Drive(installed.disk.cidata, media="cdrom")]).start()
    # nobody touches it: it must restart by itself (QEMU exits: -no-reboot)
    trial.wait_exit(BOOT_TIMEOUT + 180, "the failed trial boot did not restart by itself")
    check(trial, bool(re.search(TRIAL_FAILED, trial.text())), "the trial restarted, but not by cos-trial-failed")
    print(f"[rollback-boot1-trial] failed and restarted by itself after {time.monotonic() - trial.started:.0f} s",
          flush=True)
    vm = networked(installed, registry, auth_registry, "rollback-boot2-fallback")
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


# ---- cos-reset from recovery (last: it wipes what the tests above left) ---------------------

def test_cos_reset_gives_a_clean_active_without_the_persistent_data(rolled_back: VM, installed: Installed) -> None:
    vm = rolled_back
    vm.run("echo mine > /usr/local/cos-test-reset && echo keep > /oem/cos-test-keep"
           " && grub-editenv /oem/grubenv set next_entry=recovery && sync")
    vm.send("systemctl reboot")
    vm.wait_exit(180, "did not go down")
    # without the cidata: its recovery-mode network stage would deploy by itself
    rec = VM(Drive(installed.disk.path, snapshot=False), name="reset-boot1-recovery").boot(BOOT_TIMEOUT)
    try:
        check(rec, "cos.mode=recovery" in rec.run("cat /proc/cmdline"), "next_entry=recovery did not boot recovery")
        start = time.monotonic()
        rec.send("cos-reset --reboot 2>&1 | tee /tmp/cos-reset.log")
        rec.expect(r"reset: active and passive are the recovery system again, COS_PERSISTENT is empty",
                   DEPLOY_TIMEOUT, fail_on=r"cos-reset: error")
        print(f"[reset-boot1-recovery] cos-reset took {time.monotonic() - start:.0f} s", flush=True)
        rec.wait_exit(300, "did not reboot after cos-reset")
    finally:
        rec.stop()
    vm = installed.disk.vm("reset-boot2-active").boot(BOOT_TIMEOUT)
    installed.vm = vm
    cmdline = vm.run("cat /proc/cmdline")
    check(vm, "cos.mode=active" in cmdline and "cos.rollback" not in cmdline and "cos.trial" not in cmdline,
          f"not a plain active boot after the reset: {cmdline}")
    check(vm, vm.run("test -e /usr/local/cos-test-reset && echo still-there || true") == "",
          "COS_PERSISTENT still holds the data written before the reset")
    check(vm, vm.run("cat /oem/cos-test-keep") == "keep", "COS_OEM was not kept")
    check(vm, vm.run("command -v hello; true") == "" and NEW_NAME not in vm.run("cat /etc/os-release"),
          "active is not the recovery system")
    env = vm.run("grub-editenv /oem/grubenv list")
    check(vm, "saved_entry" not in env and "cos_trial" not in env, f"grubenv after the reset: {env}")

