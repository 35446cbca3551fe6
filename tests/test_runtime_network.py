"""Network and SSH access of a booted image (cos-network), in QEMU under TCG on the raw
disk (recovery), with one virtio NIC on restricted user networking (no way out) and the
guest's port 22 forwarded from 127.0.0.1:

- the NIC gets QEMU's DHCP address 10.0.2.15 from networkd, network-online.target can
  be reached, /etc/resolv.conf is resolved's stub (restricted slirp's DHCP offers no
  gateway and no name server, by design of restrict=on, so there is none to check);
- sshd runs and serves the host key the machine made on this boot: the image carries
  none, and a second boot of a fresh copy has a different one;
- a key logs in with the host's ssh client; password login is refused (the server offers
  publickey only, `sshd -T` says passwordauthentication no);
- the second machine is an EC2 instance on an NVMe disk (as on Nitro): its only way out
  is a guestfwd for 169.254.169.254:80 to an IMDSv2 server on the host's 127.0.0.1
  (slirp moved to 169.254.0.0/16). Its first boot (recovery) takes the user-data from the
  datasource with a token, never with an IMDSv1 GET: a `layout` adding COS_STATE and
  COS_PERSISTENT, then `cos-deploy && reboot`. The second boot is the deployed system
  (active.img, read-only /); there the user-data's user and root's key from IMDS are
  applied again, both keys log in over SSH, and the host itself is not reachable.

The image checks (no host keys, the drop-in) read the built squashfs without booting."""
from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.qemu import BOOT_FAILED, VM, Drive, GuestForward, Network, free_port, grown_copy
from tests.servers.imds import Ec2Imds
from tests.test_boot import BOOT_TIMEOUT, artifact, check, require

pytestmark = [pytest.mark.slow]
SSH_BASE = ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=30", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
WAIT = 180  # s for DHCP / sshd after the login prompt (TCG on a busy 2-core host)
DEPLOY_TIMEOUT = 1500  # s from recovery's login prompt to the reboot after cos-deploy


def keypair(directory: Path) -> tuple[Path, str]:
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cos-test", "-f", key], check=True)
    return key, key.with_suffix(".pub").read_text().strip()


def ssh(port: int, *args: str, key: Path | None = None) -> subprocess.CompletedProcess:
    auth = ["-i", str(key), "-o", "IdentitiesOnly=yes"] if key else []
    return subprocess.run([*SSH_BASE, *auth, "-p", str(port), *args], capture_output=True, text=True, timeout=120, check=False)


def fingerprint(pub_line: str, tmp: Path) -> str:
    f = tmp / "k.pub"
    f.write_text(pub_line + "\n")
    return subprocess.run(["ssh-keygen", "-lf", f], capture_output=True, text=True, check=True).stdout.split()[1]


EC2_USER_DATA = """\
name: "From EC2 user-data"
stages:
  rootfs.after:
    - name: "Repart image"
      layout:
        device: {{label: COS_RECOVERY}}
        add_partitions:
          - {{fsLabel: COS_STATE, size: 4096, pLabel: state}}
          - {{fsLabel: COS_PERSISTENT, pLabel: persistent}}
  network:
    - if: '[ -f "/run/cos/recovery_mode" ]'
      name: "Deploy"
      commands:
        - cos-deploy --no-verify --no-cosign && shutdown -r now
  boot:
    - name: "Test user"
      users:
        cosuser:
          groups: [users]
          ssh_authorized_keys:
            - "{key}"
      files:
        - path: /run/cos/from-ec2-user-data
          content: "yes"
"""


@pytest.fixture
def imds() -> Iterator[Ec2Imds]:
    server = Ec2Imds()
    yield server
    server.stop()


def boot_on_network(drive: Drive, name: str, network: Network) -> VM:
    require("uefi")
    vm = VM(drive, name=name, network=network).boot(BOOT_TIMEOUT)
    try:
        vm.run(f"timeout {WAIT} /usr/lib/systemd/systemd-networkd-wait-online --any", timeout=WAIT + 30)
        vm.run(f"timeout {WAIT} sh -c 'until systemctl -q is-active ssh.service; do sleep 1; done'",
               timeout=WAIT + 30)
    except BaseException:
        vm.stop()
        raise
    return vm


def served_host_key(port: int, tmp: Path) -> str:
    """The ed25519 host key's fingerprint as the host's ssh-keyscan gets it over the forward."""
    scan = subprocess.run(["ssh-keyscan", "-T", "30", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
                          capture_output=True, text=True, timeout=120, check=False)
    line = next((ln for ln in scan.stdout.splitlines() if "ssh-ed25519" in ln), None)
    assert line, f"ssh-keyscan got no ed25519 key: {scan.stdout!r} {scan.stderr!r}"
    return fingerprint(line.split(None, 1)[1], tmp)


def check_network(vm: VM, address: str = "10.0.2.15/24") -> None:
    addrs = vm.run("ip -4 -o addr show scope global")
    check(vm, f"inet {address}" in addrs, f"no DHCP address {address}:\n{addrs}")
    nic = vm.run("ls /sys/class/net | grep -E '^(en|eth)' | head -n 1")
    status = vm.run(f"networkctl status --no-pager -n 0 {nic}")
    check(vm, "80-cos-dhcp.network" in status, f"{nic} is not configured by our .network:\n{status}")
    vm.run("systemctl start network-online.target", timeout=120)  # wait-online succeeds: the NIC is online
    check(vm, vm.run("systemctl is-active network-online.target systemd-networkd systemd-resolved")
          .split() == ["active"] * 3, "network-online / networkd / resolved not active")
    check(vm, vm.run("readlink /etc/resolv.conf").endswith("run/systemd/resolve/stub-resolv.conf"),
          "/etc/resolv.conf is not resolved's stub")


def test_image_has_no_host_keys_and_keys_only_ssh(flavor_build, flavor_paths, tmp_path):
    squashfs = flavor_paths.build / "rootfs.squashfs"
    listing = subprocess.run(["unsquashfs", "-l", "-no-progress", squashfs], capture_output=True, text=True,
                             check=True).stdout
    ssh_files = [ln for ln in listing.splitlines() if "/etc/ssh/" in ln]
    assert any(ln.endswith("/etc/ssh/sshd_config.d/50-cos-pwauth.conf") for ln in ssh_files), ssh_files
    assert not [ln for ln in ssh_files if "ssh_host_" in ln], "host keys are baked into the image"
    subprocess.run(["unsquashfs", "-no-progress", "-d", tmp_path / "x", squashfs,
                    "etc/ssh/sshd_config.d/50-cos-pwauth.conf", "etc/ssh/sshd_config"], check=True,
                   capture_output=True)
    assert "PasswordAuthentication no" in (tmp_path / "x/etc/ssh/sshd_config.d/50-cos-pwauth.conf").read_text()
    assert "Include /etc/ssh/sshd_config.d/*.conf" in (tmp_path / "x/etc/ssh/sshd_config").read_text()


@pytest.mark.boot
def test_dhcp_sshd_and_host_keys_made_per_machine(flavor_build, build_dir, tmp_path, imds):
    raw = artifact(flavor_build, build_dir, "raw")
    key, pub = keypair(tmp_path)
    (tmp_path / "user").mkdir()
    user_key, user_pub = keypair(tmp_path / "user")
    imds_port = imds.start(user_data=EC2_USER_DATA.format(key=user_pub), public_keys={"cos-test": pub})
    # the EC2 machine: room for the layout (4 GiB COS_STATE: active + passive + a transition)
    ec2_disk = Drive(grown_copy(raw, tmp_path / "ec2.raw", "+6G"), media="nvme", snapshot=False)
    metadata = [GuestForward("169.254.169.254", 80, imds_port)]
    served = []
    for n in (1, 2):  # each machine starts from the artifact as built: a fresh machine
        port = free_port()
        if n == 1:
            vm = boot_on_network(Drive(raw), "net-boot1", Network(hostfwd={port: 22}))
        else:
            deploy_from_ec2_user_data(ec2_disk, metadata)
            vm = boot_on_network(ec2_disk, "ec2-deployed", Network(hostfwd={port: 22}, guestfwd=metadata))
        try:
            if n == 1:
                check_network(vm)
            else:  # slirp moved to 169.254.0.0/16 so that the guestfwd address is its own
                check_network(vm, "169.254.2.15/16")  # a /16 slirp leases x.x.2.15, host is x.x.2.2
                check_deployed(vm)
                check_ec2_instance(vm, imds, imds_port)
            check(vm, vm.run("systemctl is-active cos-ssh-keygen.service") == "active", "keygen unit not run")
            guest = fingerprint(vm.run("cat /etc/ssh/ssh_host_ed25519_key.pub"), tmp_path)
            served.append(served_host_key(port, tmp_path))
            check(vm, served[-1] == guest, f"sshd serves {served[-1]}, the machine made {guest}")
            check(vm, vm.run("sshd -T | grep -i '^passwordauthentication '") == "passwordauthentication no",
                  "sshd -T: password authentication is on")
            refused = ssh(port, "-o", "PubkeyAuthentication=no",
                          "-o", "PreferredAuthentications=password,keyboard-interactive", "root@127.0.0.1", "true")
            check(vm, refused.returncode == 255 and "Permission denied (publickey)" in refused.stderr,
                  f"password login not refused as expected: {refused.returncode} {refused.stderr!r}")
            if n == 1:  # a key authorized by hand; on the EC2 boot they come from the metadata
                vm.run(f"install -d -m 0700 /root/.ssh && echo '{pub}' > /root/.ssh/authorized_keys"
                       " && chmod 0600 /root/.ssh/authorized_keys")
                logins = [("root", key)]
            else:
                logins = [("root", key), ("cosuser", user_key)]
            boot_id = vm.run("cat /proc/sys/kernel/random/boot_id")
            for user, k in logins:
                login = ssh(port, f"{user}@127.0.0.1", "id -un; cat /proc/sys/kernel/random/boot_id", key=k)
                check(vm, login.returncode == 0, f"{user}: key login failed: {login.stderr}")
                check(vm, login.stdout.split() == [user, boot_id], f"{user}: ssh reached {login.stdout!r}")
            if n == 2:  # a key given to nobody else is refused
                stranger = ssh(port, "root@127.0.0.1", "true", key=user_key)
                check(vm, stranger.returncode == 255, f"root accepted cosuser's key: {stranger.stdout!r}")
            vm.poweroff()
        finally:
            vm.stop()
    assert served[0] != served[1], "two fresh machines of the image have the same SSH host key"


def deploy_from_ec2_user_data(drive: Drive, metadata: list[GuestForward]) -> None:
    """The instance's first boot (recovery): the network stage fetches the user-data, whose
    layout runs late and whose network step deploys and reboots; QEMU (-no-reboot) exits."""
    vm = VM(drive, name="ec2-deploy", network=Network(guestfwd=metadata)).start()
    try:
        vm.expect(r"login: |reboot: Restarting system", BOOT_TIMEOUT, fail_on=BOOT_FAILED)
    except BaseException:
        vm.stop()
        raise
    vm.wait_exit(DEPLOY_TIMEOUT, "the EC2 user-data did not deploy and reboot")
    print(f"[ec2-deploy] recovery boot, IMDS user-data, layout and cos-deploy: "
          f"{time.monotonic() - vm.started:.0f} s", flush=True)


def check_deployed(vm: VM) -> None:
    """The second boot runs the deployed system: active.img, read-only, from the NVMe disk."""
    cmdline = vm.run("cat /proc/cmdline")
    check(vm, "cos.mode=active" in cmdline, f"not the active system: {cmdline}")
    check(vm, vm.run("blkid -s LABEL -o value $(findmnt -n -o SOURCE /)") == "COS_ACTIVE", "/ is not COS_ACTIVE")
    check(vm, "ro" in vm.run("findmnt -n -o OPTIONS /").split(","), "/ is not mounted read-only")
    check(vm, vm.run("findmnt -n -o FSTYPE /tmp") == "tmpfs", "/tmp is not a tmpfs on the read-only root")
    failed = vm.run("systemctl list-units --failed --plain --no-legend --no-pager")
    check(vm, failed == "", f"units failed on the deployed system:\n{failed}")
    state = vm.run("blkid -L COS_STATE")
    check(vm, state.startswith("/dev/nvme0n1p"), f"COS_STATE is {state}, not on the NVMe disk")


def check_ec2_instance(vm: VM, imds: Ec2Imds, imds_port: int) -> None:
    """The EC2 boot: user-data and keys came over IMDSv2 only, and were applied."""
    # the network stage (where network datasources are asked) runs after the login prompt
    state = vm.run("timeout 600 sh -c 'until systemctl show -P ActiveState cos-setup-network.service"
                   " | grep -qE \"^(active|failed)$\"; do sleep 2; done';"
                   " systemctl show -P ActiveState cos-setup-network.service", timeout=630)
    logs = vm.run("tail -n 40 /run/cos/setup-*.log; journalctl -b -u cos-setup-network -n 40 --no-pager", check=False)
    check(vm, state == "active", f"the network stage ended {state}:\n{logs}")
    check(vm, vm.run("cat /run/cos/from-ec2-user-data 2>&1", check=False) == "yes",
          f"the EC2 user-data was not applied:\n{logs}")
    vm.run("udevadm settle --timeout=60")
    labels = vm.run("lsblk -n -r -o LABEL /dev/nvme0n1").split()
    check(vm, {"COS_STATE", "COS_PERSISTENT"} <= set(labels), f"the EC2 user-data's layout did not run: {labels}")
    fetched = [r for r in imds.requests if r.method == "GET" and r.path == "/latest/user-data"]
    assert fetched, f"user-data was never asked for: {[(r.method, r.path) for r in imds.requests]}"
    assert imds.v1_refused == 0, "the EC2 datasource sent a GET without an IMDSv2 token"
    # restrict=on: the host itself (slirp's 169.254.2.2) is not reachable, only the forward
    before = len(imds.requests)
    other = vm.run(f"curl -sS --max-time 10 http://169.254.2.2:{imds_port}/latest/meta-data/ 2>&1", check=False)
    check(vm, len(imds.requests) == before, f"the guest reached the host's server directly: {other!r}")
