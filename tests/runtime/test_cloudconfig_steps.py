"""Every step key of cos-setup, run for real against a scratch root."""
from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from runtime.cloudconfig.shacrypt import sha512_crypt

from .cloudconfig_root import log_of, root_fixture, stage, write_config  # noqa: F401 (a fixture)


def one_step(root: Path, step: str, name: str = "initramfs") -> bool:
    first, *rest = step.strip().splitlines()
    write_config(root, "/oem/50_test.yaml", f"stages:\n  {name}:\n    - {first}\n" + "".join(
        f"      {line}\n" for line in rest))
    return stage(root, name)


def shadow_hash(root: Path, user: str) -> str:
    return next(line.split(":")[1] for line in (root / "etc/shadow").read_text().splitlines()
                if line.startswith(f"{user}:"))


def openssl_hash(password: str, salted_like: str) -> str:
    salt = salted_like.split("$")[2]
    return subprocess.run(["openssl", "passwd", "-6", "-salt", salt, password], check=True,
                          capture_output=True, text=True).stdout.strip()


# -- files / directories ----------------------------------------------------------------
def test_files_all_encodings_permissions_and_owner(root: Path) -> None:
    gz = base64.b64encode(gzip.compress(b"gzipped\n")).decode()
    (root / "etc/old").write_text("old")
    write_config(root, "/oem/50.yaml", f"""\
        stages:
          boot:
            - users: {{alice: {{}}}}
              files:
                - {{path: /etc/plain, content: "plain\\n"}}
                - {{path: /etc/b64, content: "{base64.b64encode(b'b64').decode()}", encoding: b64, permissions: 0600}}
                - {{path: /etc/deep/dir/gz, content: "{gz}", encoding: gz+b64, permissions: "0755"}}
                - {{path: /etc/owned, content: x, ownerstring: "alice:sudo"}}
                - {{path: /etc/numeric, content: x, owner: 4321, group: 1234}}
                - {{path: /etc/old, content: new}}
        """)
    assert stage(root, "boot")
    assert (root / "etc/plain").read_text() == "plain\n"
    assert (root / "etc/b64").read_bytes() == b"b64" and (root / "etc/b64").stat().st_mode & 0o7777 == 0o600
    assert (root / "etc/deep/dir/gz").read_bytes() == b"gzipped\n"
    assert (root / "etc/deep/dir/gz").stat().st_mode & 0o7777 == 0o755
    assert (root / "etc/plain").stat().st_mode & 0o7777 == 0o644
    st = (root / "etc/owned").stat()
    assert (st.st_uid, st.st_gid) == (1000, 27)  # alice from the root's passwd, not the host's
    assert ((root / "etc/numeric").stat().st_uid, (root / "etc/numeric").stat().st_gid) == (4321, 1234)
    assert (root / "etc/old").read_text() == "new"
    assert not list((root / "etc").glob(".*.*")), "no temporary files left behind"


@pytest.mark.parametrize("entry, message", [
    ("{path: /etc/x, content: '!!notbase64', encoding: b64}", "files[0].content: not valid b64"),
    ("{path: /etc/x, content: x, encoding: rot13}", "unknown encoding 'rot13'"),
    ("{path: etc/x, content: x}", "'etc/x' is not an absolute path"),
    ("{path: /etc/../../x, content: x}", "'/etc/../../x' contains '..'"),
    ("{path: /etc/x, content: x, permision: 0644}", "unknown key 'permision'"),
    ("{path: /etc/x, content: x, permissions: '0999'}", "expected octal permissions"),
    ("{content: x}", "missing required key 'path'"),
    ("{path: /etc/x, content: x, owner: nobody-here}", "user 'nobody-here' does not exist"),
])
def test_files_bad_input_is_one_clear_error(root: Path, entry: str, message: str) -> None:
    assert not one_step(root, f"name: bad file\nfiles:\n  - {entry}")
    log = log_of(root, "initramfs")
    assert "/oem/50_test.yaml: initramfs: step 'bad file'" in log and message in log
    assert not (root / "etc/x").exists()


def test_directories(root: Path) -> None:
    assert one_step(root, "directories:\n  - {path: /var/lib/app/data, permissions: 0750, owner: 1, group: 1}")
    d = root / "var/lib/app/data"
    assert d.is_dir() and d.stat().st_mode & 0o7777 == 0o750 and (d.stat().st_uid, d.stat().st_gid) == (1, 1)


# -- commands / if ------------------------------------------------------------------------
def test_commands_run_in_the_root_with_cos_root(root: Path) -> None:
    assert one_step(root, 'commands:\n  - echo "$COS_STAGE" > "$COS_ROOT/etc/from-cmd"\n  - pwd > cwd')
    assert (root / "etc/from-cmd").read_text() == "initramfs\n"
    assert Path((root / "cwd").read_text().strip()) == root


def test_failing_command_stops_its_step_not_the_stage(root: Path) -> None:
    write_config(root, "/oem/50.yaml", """\
        stages:
          boot:
            - name: broken
              commands: ["echo partial > $COS_ROOT/a", "echo to-stdout; echo to-stderr >&2; exit 7",
                         "echo never > $COS_ROOT/b"]
            - name: after
              commands: ["echo after > $COS_ROOT/c"]
        """)
    write_config(root, "/oem/60.yaml", "stages:\n  boot:\n    - commands: ['touch $COS_ROOT/d']\n")
    assert not stage(root, "boot")
    assert (root / "a").exists() and not (root / "b").exists() and (root / "c").exists() and (root / "d").exists()
    log = log_of(root, "boot")
    assert "/oem/50.yaml: boot: step 'broken': commands: FAILED: command exited 7: echo to-stdout;" in log
    assert "  | to-stdout\n" in log and "  | to-stderr\n" in log  # the command's output, in the stage log


def test_if_false_skips_the_step_with_a_log_line(root: Path) -> None:
    write_config(root, "/oem/50.yaml", """\
        stages:
          boot:
            - name: only in recovery
              if: '[ -f "$COS_ROOT/run/cos/recovery_mode" ]'
              commands: ["touch $COS_ROOT/ran"]
        """)
    assert stage(root, "boot") and not (root / "ran").exists()
    assert "step 'only in recovery': skipped: if '[ -f \"$COS_ROOT/run/cos/recovery_mode\" ]' exited 1" in log_of(
        root, "boot")
    (root / "run/cos/recovery_mode").touch()
    assert stage(root, "boot") and (root / "ran").exists()


# -- environment / hostname / dns / sysctl / modules --------------------------------------
def test_environment_merges(root: Path) -> None:
    (root / "etc/environment").write_text('# keep\nPATH="/usr/bin"\nKEEP=1\n')
    assert one_step(root, "environment: {PATH: /usr/local/bin:/usr/bin, NEW: 'two words'}")
    assert (root / "etc/environment").read_text() == \
        '# keep\nPATH=/usr/local/bin:/usr/bin\nKEEP=1\nNEW="two words"\n'


def test_hostname_writes_hostname_and_hosts(root: Path) -> None:
    assert one_step(root, "hostname: node-{{.MachineID}}")
    assert (root / "etc/hostname").read_text() == "node-0123456789abcdef0123456789abcdef\n"
    hosts = (root / "etc/hosts").read_text()
    assert "127.0.0.1\tlocalhost\n" in hosts and "127.0.1.1\tnode-0123456789abcdef0123456789abcdef\n" in hosts
    assert one_step(root, "hostname: other.example.com")
    hosts = (root / "etc/hosts").read_text()
    assert hosts.count("127.0.1.1") == 1 and "127.0.1.1\tother.example.com other\n" in hosts


def test_hostname_invalid(root: Path) -> None:
    assert not one_step(root, "hostname: 'bad name!'")
    assert "'bad name!' is not a valid hostname" in log_of(root, "initramfs")


def test_dns(root: Path) -> None:
    (root / "etc/resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    assert one_step(root, "dns: {nameservers: [1.1.1.1, '2606:4700::1111'], search: [example.com]}")
    text = (root / "etc/resolv.conf").read_text()
    assert "nameserver 1.1.1.1\nnameserver 2606:4700::1111\nsearch example.com\n" in text
    assert not one_step(root, "dns: {nameservers: [dns.example.com]}")
    assert "'dns.example.com' is not an IP address" in log_of(root, "initramfs")


def test_sysctl_on_a_scratch_root_goes_to_sysctl_d(root: Path) -> None:
    assert one_step(root, "sysctl: {net.ipv4.ip_forward: 1, vm.swappiness: 10}")
    assert one_step(root, "sysctl: {vm.swappiness: 20}")
    assert (root / "etc/sysctl.d/90-cos-setup.conf").read_text() == "net.ipv4.ip_forward = 1\nvm.swappiness = 20\n"


def test_modules_file(root: Path) -> None:
    assert one_step(root, "modules: [br_netfilter, overlay]")
    assert one_step(root, "modules: [overlay, vfio]")
    assert (root / "etc/modules-load.d/cos-setup.conf").read_text() == "br_netfilter\noverlay\nvfio\n"
    assert not one_step(root, "modules: ['bad name']")


# -- systemctl ----------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl not installed")
def test_systemctl_enable_disable_mask_in_the_root(root: Path) -> None:
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    for name in ("app", "old"):
        (units / f"{name}.service").write_text(
            "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "old.service").symlink_to("/usr/lib/systemd/system/old.service")
    assert one_step(root, "systemctl: {enable: [app.service], disable: [old.service], mask: [bad.service], "
                          "start: [app.service]}")
    assert (wants / "app.service").is_symlink() and not (wants / "old.service").exists()
    assert str((root / "etc/systemd/system/bad.service").readlink()) == "/dev/null"
    assert "systemctl start app.service: skipped" in log_of(root, "initramfs")
    assert not one_step(root, "systemctl: {enable: [missing.service]}")
    assert "'systemctl' exited" in log_of(root, "initramfs")


# -- users / authorized_keys ----------------------------------------------------------------
def test_users_create_with_plain_password_groups_shell_home_and_keys(root: Path) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests alice@test"
    os.chown(root / "etc/shadow", 0, 42)  # Debian: root:shadow 0640
    assert one_step(root, f"""\
users:
  alice:
    passwd: "s3cret pass"
    groups: [sudo, docker]
    shell: /bin/zsh
    ssh_authorized_keys: ["{key}"]
authorized_keys:
  alice: ["{key}", "ssh-rsa AAAAB3Second alice@two"]""", "boot")
    passwd = (root / "etc/passwd").read_text()
    assert "alice:x:1000:1000::/home/alice:/bin/zsh\n" in passwd
    hashed = shadow_hash(root, "alice")
    assert hashed.startswith("$6$") and hashed == openssl_hash("s3cret pass", hashed)
    group = (root / "etc/group").read_text()
    assert "sudo:x:27:bob,alice\n" in group  # appended to bob, not replaced
    assert "alice:x:1000:\n" in group and "docker:x:1001:alice\n" in group
    assert "sudo:*::bob,alice\n" in (root / "etc/gshadow").read_text()
    home = root / "home/alice"
    assert home.stat().st_mode & 0o777 == 0o700 and (home.stat().st_uid, home.stat().st_gid) == (1000, 1000)
    assert (home / ".profile").read_text() == "# skel\n" and (home / ".profile").stat().st_uid == 1000
    keys = home / ".ssh/authorized_keys"
    assert keys.read_text() == f"{key}\nssh-rsa AAAAB3Second alice@two\n"  # users first, then deduplicated
    assert keys.stat().st_mode & 0o777 == 0o600 and keys.stat().st_uid == 1000
    assert (home / ".ssh").stat().st_mode & 0o777 == 0o700
    shadow = (root / "etc/shadow").stat()
    assert (shadow.st_mode & 0o777, shadow.st_gid) == (0o640, 42)  # the account files keep mode and owner


def test_users_existing_user_hash_lock_and_homedir(root: Path) -> None:
    given = sha512_crypt("cos", "fixedsalt")
    assert one_step(root, f"users:\n  root: {{passwd: '{given}'}}\n  daemon: {{lock: true}}")
    assert shadow_hash(root, "root") == given
    assert shadow_hash(root, "daemon") == "!*"
    assert [line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("root:")] == \
        ["root:x:0:0:root:/root:/bin/bash"]
    assert one_step(root, "users:\n  svc: {homedir: /srv/svc, uid: 2000, primary_group: daemon, no_create_home: true}")
    assert "svc:x:2000:1::/srv/svc:/bin/sh\n" in (root / "etc/passwd").read_text()
    assert not (root / "srv/svc").exists()


def test_users_bad_input(root: Path) -> None:
    assert not one_step(root, "name: bad user\nusers:\n  alice: {password: x}")
    assert "users.alice: unknown key 'password'" in log_of(root, "initramfs")
    assert "alice" not in (root / "etc/passwd").read_text()


def test_authorized_keys_for_a_missing_user(root: Path) -> None:
    assert not one_step(root, "authorized_keys: {nobody: [ssh-ed25519 AAAA]}")
    assert "user 'nobody' does not exist" in log_of(root, "initramfs")


def test_sha512_crypt_matches_openssl() -> None:
    for password in ("cos", "ü" * 40, "x" * 64, "y" * 65, "z" * 200):
        for salt in ("a", "abcdefgh", "0123456789abcdef"):
            mine = sha512_crypt(password, salt)
            assert mine == openssl_hash(password, mine)


# -- layout -----------------------------------------------------------------------------
def test_layout_failure_is_logged_and_does_not_stop_the_stage(root: Path) -> None:
    write_config(root, "/oem/50.yaml", """\
        stages:
          rootfs.after:
            - name: Repart image
              layout:
                device: {path: /dev/does-not-exist-cos-test}
                add_partitions: [{fsLabel: COS_STATE, size: 8192, pLabel: state}]
            - name: after layout
              commands: ["touch $COS_ROOT/after"]
        """)
    assert not stage(root, "rootfs")
    assert (root / "after").exists()
    assert "/oem/50.yaml: rootfs.after: step 'Repart image': layout: FAILED:" in log_of(root, "rootfs")


def test_layout_not_a_mapping(root: Path) -> None:
    assert not one_step(root, "layout: [x]")
    assert "layout: expected a mapping, got a list" in log_of(root, "initramfs")


LAYOUT_LANDED = importlib.util.find_spec("runtime.install.disks") is not None


@pytest.mark.skipif(not LAYOUT_LANDED, reason="runtime/install/layout.py (branch deploy) not merged yet")
@pytest.mark.skipif(shutil.which("sgdisk") is None or shutil.which("mkfs.ext4") is None,
                    reason="needs gdisk and e2fsprogs")
def test_layout_through_the_runner_on_a_disk_file_then_nothing_changes(root: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(128 * 1024 * 1024)
    subprocess.run(["sgdisk", "--clear", "--new=1:2048:+16M", "--change-name=1:recovery", disk], check=True,
                   capture_output=True)
    write_config(root, "/oem/50.yaml", f"""\
        stages:
          rootfs.after:
            - name: Repart image
              layout:
                device: {{path: {disk}}}
                add_partitions:
                  - {{fsLabel: COS_STATE, size: 32, pLabel: state}}
                  - {{fsLabel: COS_PERSISTENT, pLabel: persistent}}
        """)
    assert stage(root, "rootfs"), log_of(root, "rootfs")
    parts = json.loads(subprocess.run(["sfdisk", "--json", disk], check=True, capture_output=True).stdout)
    names = [(p.get("name"), p["size"] * 512 // 2**20) for p in parts["partitiontable"]["partitions"]]
    assert names[:2] == [("recovery", 16), ("state", 32)] and names[2][0] == "persistent" and names[2][1] > 60
    first = hashlib.sha256(disk.read_bytes()).hexdigest()
    assert stage(root, "rootfs")
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == first
