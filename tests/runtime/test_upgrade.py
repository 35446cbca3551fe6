"""cos-upgrade for real on the host: the CLI in a subprocess against a scratch root, a
tmpfs standing for COS_STATE, images built with umoci and pushed with skopeo into a real
registry v2 server (Debian's docker-registry) on 127.0.0.1; the pulled images are
unpacked by the real umoci and written by the real mkfs.ext4, checked with debugfs."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.install import deploy, grubenv
from runtime.upgrade import oci, upgrade
from runtime.upgrade import source as upgrade_source
from tests.servers.registry import Registry, start_registry, stop
from tests.servers.util import free_port

REPO = Path(__file__).resolve().parents[2]
MENU_SRC = REPO / "packages/cos-grub/files/etc/cos"
NAME = "cos/red"

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("skopeo", "umoci", "docker-registry")),
                                reason="skopeo, umoci and docker-registry are needed (scripts/install-deps)")


def sh(*cmd: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True)


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "runtime.upgrade.cli", *(str(a) for a in args)]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), cwd=REPO, capture_output=True, text=True, timeout=600)


def debugfs(image: Path, request: str) -> str:
    return sh("debugfs", "-R", request, image).stdout


def inode_of(image: Path, path: str) -> int:
    return int(debugfs(image, f"stat {path}").split("Inode:")[1].split()[0])


# ---- images ---------------------------------------------------------------------------------

def cos_tree(rootfs: Path, version: str, data_mib: int = 2) -> None:
    """What check_cos_image looks for, plus hard links and a file a later layer deletes."""
    (rootfs / "boot").mkdir(parents=True, exist_ok=True)
    (rootfs / "boot/vmlinuz-6.1").write_bytes(b"kernel " + version.encode())
    os.symlink("vmlinuz-6.1", rootfs / "boot/vmlinuz")
    (rootfs / "boot/initrd").write_bytes(b"initrd " + version.encode())
    (rootfs / "usr/lib/cos").mkdir(parents=True)
    (rootfs / "usr/lib/cos/python-run").write_text("#!/bin/sh\n")
    (rootfs / "etc/cos").mkdir(parents=True)
    for name in ("grub.cfg", "bootargs.cfg"):
        (rootfs / "etc/cos" / name).write_bytes((MENU_SRC / name).read_bytes())
    (rootfs / "etc/os-release").write_text(f'NAME="cOS red"\nVERSION="{version}"\n')
    (rootfs / "usr/bin").mkdir(parents=True)
    for i in range(data_mib):
        (rootfs / f"usr/bin/tool{i}").write_bytes(os.urandom(1024 * 1024))
    os.link(rootfs / "usr/bin/tool0", rootfs / "usr/bin/tool0-hardlink")
    (rootfs / "usr/bin/obsolete").write_text("removed by the next layer\n")


def new_layout(layout: Path, bundle: Path, fill: object) -> None:
    sh("umoci", "init", "--layout", layout)
    sh("umoci", "new", "--image", f"{layout}:cos")
    sh("umoci", "unpack", "--image", f"{layout}:cos", bundle)
    fill(bundle / "rootfs")   # type: ignore[operator]
    sh("umoci", "repack", "--image", f"{layout}:cos", bundle)


def add_layer(base: Path, layout: Path, bundle: Path, change: object) -> None:
    shutil.copytree(base, layout, symlinks=True)
    sh("umoci", "unpack", "--image", f"{layout}:cos", bundle)
    change(bundle / "rootfs")   # type: ignore[operator]
    sh("umoci", "repack", "--image", f"{layout}:cos", bundle)


def v2_change(rootfs: Path) -> None:
    (rootfs / "usr/bin/obsolete").unlink()                        # a whiteout in the new layer
    (rootfs / "usr/bin/hello").write_text("#!/bin/sh\necho hello\n")
    os.link(rootfs / "usr/bin/hello", rootfs / "usr/bin/hello-again")
    (rootfs / "etc/os-release").write_text('NAME="cOS red"\nVERSION="0.2.0"\nVARIANT="upgraded"\n')


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    w = tmp_path_factory.mktemp("images")
    new_layout(w / "v1", w / "b1", lambda r: cos_tree(r, "0.1.0"))
    add_layer(w / "v1", w / "v2", w / "b2", v2_change)
    new_layout(w / "big", w / "b3", lambda r: cos_tree(r, "0.3.0", data_mib=160))
    new_layout(w / "plain", w / "b4", lambda r: (r / "etc").mkdir() or (r / "etc/os-release").write_text("x\n"))
    new_layout(w / "badmenu", w / "b5", bad_menu)
    new_layout(w / "wrongmenu", w / "b6", wrong_menu)
    return {"v1": w / "v1", "v2": w / "v2", "big": w / "big", "plain": w / "plain", "badmenu": w / "badmenu",
            "wrongmenu": w / "wrongmenu"}


def bad_menu(rootfs: Path) -> None:
    """A cOS image whose grub.cfg lost a `fi`: GRUB could boot neither active nor passive."""
    cos_tree(rootfs, "0.4.0")
    cfg = rootfs / "etc/cos/grub.cfg"
    cfg.write_text(cfg.read_text() + "if [ -n \"$cos_trial\" ]; then\n  echo trial\n")


def wrong_menu(rootfs: Path) -> None:
    """A menu that parses but whose fallback entry looks for a label no disk has."""
    cos_tree(rootfs, "0.5.0")
    cfg = rootfs / "etc/cos/grub.cfg"
    text = cfg.read_text()
    head, fallback = text.split('--id fallback', 1)
    cfg.write_text(head + '--id fallback' + fallback.replace("COS_STATE", "COS_STAT", 1))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]) -> Iterator[dict[str, object]]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        digests = {"v1": reg.push_dir(images["v1"], NAME, "red-0.1.0-amd64"),
                   "v2": reg.push_dir(images["v2"], NAME, "red-0.2.0-amd64"),
                   "big": reg.push_dir(images["big"], NAME, "big-0.3.0-amd64"),
                   "plain": reg.push_dir(images["plain"], "library/plain", "1"),
                   "badmenu": reg.push_dir(images["badmenu"], NAME, "badmenu-0.4.0-amd64"),
                   "wrongmenu": reg.push_dir(images["wrongmenu"], NAME, "wrongmenu-0.5.0-amd64")}
        reg.push_dir(images["v1"], NAME, "red-latest-amd64")
        yield {"reg": reg, "digests": digests}
    finally:
        stop(reg.proc)


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("auth-registry"), auth=True)
    try:
        reg.push_dir(images["v2"], NAME, "red-0.2.0-amd64")
        yield reg
    finally:
        stop(reg.proc)


# ---- a deployed machine ---------------------------------------------------------------------

def tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")


@pytest.fixture
def machine(tmp_path: Path, registry: dict[str, object]) -> Iterator[dict[str, Path]]:
    """A scratch root with active.img + passive.img of version 0.1.0 on a tmpfs COS_STATE."""
    root, state, oem = tmp_path / "root", tmp_path / "state", tmp_path / "oem"
    (root / "var/tmp").mkdir(parents=True)
    (root / "run/cos").mkdir(parents=True)
    (root / "etc/containers").mkdir(parents=True)
    reg = registry["reg"]
    assert isinstance(reg, Registry)
    (root / "etc/containers/registries.conf").write_text(reg.registries_conf())
    oem.mkdir()
    (oem / "grubenv").write_bytes(grubenv.encode({"brand": "kept"}))
    tmpfs(state, "1G")
    try:
        old = tmp_path / "old"
        cos_tree(old, "0.1.0")
        (old / "usr/bin/obsolete").unlink()
        (old / "etc/old-system").write_text("yes\n")
        from runtime.system import System
        size = deploy.image_size(old)
        (state / "cOS").mkdir()
        deploy.make_active(System(), old, state, size)
        deploy.make_passive(System(), state)
        yield {"root": root, "state": state, "oem": oem, "tmp": tmp_path}
    finally:
        sh("umount", state, check=False)


def args_for(m: dict[str, Path], *extra: str | Path) -> list[str | Path]:
    return ["--root", m["root"], "--state", m["state"], "--oem", m["oem"], *extra]


def snapshot(state: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(state)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(state.rglob("*"))}


def image_of(m: dict[str, Path], name: str, registry: dict[str, object], tag: str) -> str:
    reg = registry["reg"]
    assert isinstance(reg, Registry)
    return f"{reg.address}/{name}:{tag}"


def assert_upgraded(m: dict[str, Path], digest: str | None) -> None:
    state = m["state"]
    active, passive = state / deploy.ACTIVE, state / deploy.PASSIVE
    assert sh("e2label", active).stdout.strip() == "COS_ACTIVE"
    assert sh("e2label", passive).stdout.strip() == "COS_PASSIVE"
    for img in (active, passive):
        sh("e2fsck", "-fn", img)
    assert "upgraded" in debugfs(active, "cat /etc/os-release")
    assert "hello" in debugfs(active, "cat /usr/bin/hello")
    assert "obsolete" not in debugfs(active, "ls /usr/bin"), "the whiteout was not applied"
    assert inode_of(active, "/usr/bin/hello") == inode_of(active, "/usr/bin/hello-again")
    assert inode_of(active, "/usr/bin/tool0") == inode_of(active, "/usr/bin/tool0-hardlink")
    assert "yes" in debugfs(passive, "cat /etc/old-system"), "passive.img is not the previous system"
    assert "upgraded" not in debugfs(passive, "cat /etc/os-release")
    leftovers = [p.name for p in (state / "cOS").iterdir() if p.name.startswith(".") or "transition" in p.name]
    assert leftovers == []
    record = json.loads((state / "cOS/active.json").read_text())
    assert record.get("digest") == digest
    env = grubenv.read(m["oem"] / "grubenv")
    assert env["cos_trial"] == "1" and env["brand"] == "kept"
    assert not (m["root"] / "var/tmp" / upgrade_source.WORK_NAME).exists()
    assert (state / "etc/cos/grub.cfg").read_bytes() == (MENU_SRC / "grub.cfg").read_bytes()   # the new menu


# ---- tests ----------------------------------------------------------------------------------

def test_upgrade_from_registry(machine: dict[str, Path], registry: dict[str, object]) -> None:
    image = image_of(machine, NAME, registry, "red-0.2.0-amd64")
    start = time.monotonic()
    proc = run_cli(*args_for(machine, "-d", image))
    assert proc.returncode == 0, proc.stderr
    digests = registry["digests"]
    assert isinstance(digests, dict)
    assert_upgraded(machine, digests["v2"])
    assert f"temporary data in {machine['root']}/var/tmp/{upgrade_source.WORK_NAME}" in proc.stderr
    assert f"verified: {digests['v2']}" in proc.stderr
    assert "pull " in proc.stderr and "unpack " in proc.stderr and "write " in proc.stderr
    print(f"upgrade -d took {time.monotonic() - start:.1f} s")


def test_no_verify_skips_the_check_but_records_the_digest(machine: dict[str, Path],
                                                          registry: dict[str, object]) -> None:
    proc = run_cli(*args_for(machine, "--no-verify", "--no-cosign", "-d",
                             image_of(machine, NAME, registry, "red-0.2.0-amd64")))
    assert proc.returncode == 0, proc.stderr
    assert "verified:" not in proc.stderr
    digests = registry["digests"]
    assert isinstance(digests, dict)
    assert_upgraded(machine, digests["v2"])


def test_channel_then_already_up_to_date(machine: dict[str, Path], registry: dict[str, object]) -> None:
    reg = registry["reg"]
    assert isinstance(reg, Registry)
    (machine["root"] / "etc/cos").mkdir(parents=True)
    (machine["root"] / "etc/cos/upgrade.yaml").write_text(f"repository: {reg.address}/{NAME}\ntags: red-*-amd64\n")
    proc = run_cli(*args_for(machine))
    assert proc.returncode == 0, proc.stderr
    assert f"newest in the channel: {reg.address}/{NAME}:red-0.2.0-amd64" in proc.stderr
    digests = registry["digests"]
    assert isinstance(digests, dict)
    assert_upgraded(machine, digests["v2"])
    before = snapshot(machine["state"])
    proc = run_cli(*args_for(machine, "--reboot"))
    assert proc.returncode == 0, proc.stderr
    assert "already up to date" in proc.stderr and "reboot" not in proc.stderr
    assert snapshot(machine["state"]) == before


def test_channel_skips_an_image_that_failed_to_boot(machine: dict[str, Path], registry: dict[str, object]) -> None:
    reg, digests = registry["reg"], registry["digests"]
    assert isinstance(reg, Registry) and isinstance(digests, dict)
    (machine["root"] / "etc/cos").mkdir(parents=True)
    (machine["root"] / "etc/cos/upgrade.yaml").write_text(f"repository: {reg.address}/{NAME}\ntags: red-*-amd64\n")
    (machine["state"] / upgrade_source.FAILED).write_text(json.dumps({"digests": [digests["v2"]]}))
    proc = run_cli(*args_for(machine))
    assert proc.returncode == 0, proc.stderr
    assert "failed to boot before" in proc.stderr
    assert json.loads((machine["state"] / "cOS/active.json").read_text())["digest"] == digests["v1"]


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cos-upgrade: error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    return errors[0]


@pytest.mark.parametrize(("case", "expected"), [
    ("plain", "is not a cOS image: it has no /boot/vmlinuz, /boot/initrd, /usr/lib/cos/python-run"),
    ("missing", "does not exist in the registry"),
    ("auth", "the registry needs credentials for"),
    ("space", "COS_STATE has"),
    ("badmenu", "its /etc/cos/grub.cfg does not parse"),
    ("wrongmenu", "its /etc/cos/grub.cfg has a menu entry fallback that does not use COS_STATE"),
])
def test_refusals_change_nothing(machine: dict[str, Path], registry: dict[str, object], auth_registry: Registry,
                                 case: str, expected: str) -> None:
    reg = registry["reg"]
    assert isinstance(reg, Registry)
    image = {"plain": f"{reg.address}/library/plain:1", "missing": f"{reg.address}/{NAME}:red-9.9.9-amd64",
             "auth": f"{auth_registry.address}/{NAME}:red-0.2.0-amd64",
             "space": f"{reg.address}/{NAME}:big-0.3.0-amd64",
             "badmenu": f"{reg.address}/{NAME}:badmenu-0.4.0-amd64",
             "wrongmenu": f"{reg.address}/{NAME}:wrongmenu-0.5.0-amd64"}[case]
    if case == "auth":
        (machine["root"] / "etc/containers/registries.conf").write_text(auth_registry.registries_conf())
    if case == "space":   # 160 MiB of data: transition.img does not fit beside active and passive
        free = shutil.disk_usage(machine["state"]).free
        with open(machine["state"] / "filler", "wb") as f:
            f.write(b"\0" * (free - 120 * 1024 ** 2))
    before = snapshot(machine["state"])
    env_before = (machine["oem"] / "grubenv").read_bytes()
    line = one_error(run_cli(*args_for(machine, "-d", image)))
    assert expected in line
    assert snapshot(machine["state"]) == before
    assert (machine["oem"] / "grubenv").read_bytes() == env_before
    if case == "auth":   # with the credentials it works
        (machine["root"] / "etc/cos/registry-auth.json").parent.mkdir(parents=True, exist_ok=True)
        (machine["root"] / "etc/cos/registry-auth.json").write_text(auth_registry.auth_json())
        proc = run_cli(*args_for(machine, "-d", image))
        assert proc.returncode == 0, proc.stderr
        assert "upgraded" in debugfs(machine["state"] / deploy.ACTIVE, "cat /etc/os-release")


def test_directory_upgrade(machine: dict[str, Path]) -> None:
    tree = machine["tmp"] / "tree"
    cos_tree(tree, "0.2.0")
    v2_change(tree)
    proc = run_cli(*args_for(machine, "--directory", tree))
    assert proc.returncode == 0, proc.stderr
    assert_upgraded(machine, None)
    assert json.loads((machine["state"] / "cOS/active.json").read_text())["image"] == str(tree)


def test_recovery_upgrade(machine: dict[str, Path], registry: dict[str, object]) -> None:
    rec = machine["tmp"] / "recovery"   # its own filesystem: the temporary data must not land on it
    tmpfs(rec, "512M")
    try:
        (rec / "cOS").mkdir(parents=True)
        (rec / "cOS/recovery.squashfs").write_text("old")
        before = snapshot(machine["state"])
        proc = run_cli(*args_for(machine, "--recovery", "--recovery-dir", rec,
                                 "-d", image_of(machine, NAME, registry, "red-0.2.0-amd64")))
        assert proc.returncode == 0, proc.stderr
        assert "upgraded" in sh("rdsquashfs", "-c", "/etc/os-release", rec / "cOS/recovery.squashfs").stdout
        assert (rec / "boot/vmlinuz").read_bytes() == b"kernel 0.1.0"
        assert not list(rec.rglob(".*"))
        assert snapshot(machine["state"]) == before
    finally:
        sh("umount", rec, check=False)


@pytest.mark.parametrize("moment", ["unpack", "swap"])
def test_killed_then_rerun_completes(machine: dict[str, Path], registry: dict[str, object], moment: str) -> None:
    """kill -9 of cos-upgrade and its children (a power cut) while umoci unpacks, or while
    passive.img is being replaced: active.img is a whole system (old, labelled COS_ACTIVE),
    and a re-run completes the upgrade."""
    image = image_of(machine, NAME, registry, "big-0.3.0-amd64")
    state = machine["state"]
    watched = (machine["root"] / "var/tmp" / upgrade_source.WORK_NAME / "rootfs" if moment == "unpack"
               else state / deploy.PASSIVE_TMP)
    proc = subprocess.Popen(cli(*args_for(machine, "-d", image)), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not watched.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert proc.poll() is None, f"the upgrade ended before {watched} was seen"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    active = state / deploy.ACTIVE
    sh("e2fsck", "-fn", active)
    assert sh("e2label", active).stdout.strip() == "COS_ACTIVE"
    assert "old-system" in debugfs(active, "ls /etc")   # still the old system, whole
    assert (state / upgrade.JOURNAL).exists() == (moment == "swap")
    start = time.monotonic()
    proc2 = run_cli(*args_for(machine, "-d", image))
    assert proc2.returncode == 0, proc2.stderr
    if moment == "swap":
        assert "completed the interrupted upgrade" in proc2.stderr
    else:
        assert "left by an interrupted upgrade" in proc2.stderr
    assert "0.3.0" in debugfs(active, "cat /etc/os-release")
    assert "old-system" in debugfs(state / deploy.PASSIVE, "ls /etc")
    sh("e2fsck", "-fn", state / deploy.PASSIVE)
    assert not (state / upgrade.JOURNAL).exists() and not (state / deploy.TRANSITION).exists()
    print(f"re-run after kill during {moment}: {time.monotonic() - start:.1f} s")


@pytest.fixture
def recovery_machine(tmp_path: Path, registry: dict[str, object]) -> Iterator[dict[str, Path]]:
    """Recovery mode, an empty tmpfs COS_STATE, the recovery tree at /run/rootfsbase."""
    root, state, oem = tmp_path / "root", tmp_path / "state", tmp_path / "oem"
    (root / "var/tmp").mkdir(parents=True)
    (root / "run/cos").mkdir(parents=True)
    (root / "run/cos/recovery_mode").touch()
    cos_tree(root / "run/rootfsbase", "0.1.0-recovery")
    (root / "etc/containers").mkdir(parents=True)
    reg = registry["reg"]
    assert isinstance(reg, Registry)
    (root / "etc/containers/registries.conf").write_text(reg.registries_conf())
    oem.mkdir()
    tmpfs(state, "1G")
    try:
        yield {"root": root, "state": state, "oem": oem}
    finally:
        sh("umount", state, check=False)


def deploy_cli(m: dict[str, Path], *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.install.cli", "--root", m["root"], "--state", m["state"],
                           "--oem", m["oem"], *(str(a) for a in extra)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_cos_deploy_from_an_image(recovery_machine: dict[str, Path], registry: dict[str, object]) -> None:
    m, digests = recovery_machine, registry["digests"]
    assert isinstance(digests, dict)
    proc = deploy_cli(m, "-d", image_of(m, NAME, registry, "red-0.2.0-amd64"))
    assert proc.returncode == 0, proc.stderr
    for name in (deploy.ACTIVE, deploy.PASSIVE):
        assert "upgraded" in debugfs(m["state"] / name, "cat /etc/os-release")
        assert json.loads((m["state"] / name).with_suffix(".json").read_text())["digest"] == digests["v2"]
    assert grubenv.read(m["oem"] / "grubenv")["next_entry"] == "cos"
    assert not (m["root"] / "var/tmp" / upgrade_source.WORK_NAME).exists()


def test_cos_deploy_without_image(recovery_machine: dict[str, Path], registry: dict[str, object]) -> None:
    """The channel's newest when reachable; an unreachable channel falls back to recovery, saying so."""
    m, reg = recovery_machine, registry["reg"]
    assert isinstance(reg, Registry)
    (m["root"] / "etc/cos").mkdir(parents=True)
    channel = m["root"] / "etc/cos/upgrade.yaml"
    channel.write_text(f"repository: {reg.address}/{NAME}\ntags: red-*-amd64\n")
    proc = deploy_cli(m)
    assert proc.returncode == 0, proc.stderr
    assert "newest in the channel" in proc.stderr
    assert "0.2.0" in debugfs(m["state"] / deploy.ACTIVE, "cat /etc/os-release")
    channel.write_text(f"repository: 127.0.0.1:{free_port()}/{NAME}\ntags: red-*-amd64\n")
    proc = deploy_cli(m, "--force")
    assert proc.returncode == 0, proc.stderr
    assert "channel is not usable" in proc.stderr and "deploying the recovery system" in proc.stderr
    assert "0.1.0-recovery" in debugfs(m["state"] / deploy.ACTIVE, "cat /etc/os-release")
    assert not (m["state"] / "cOS/active.json").exists()


# ---- the layer cache, and the upgrade after a rollback ---------------------------------------

def blob_gets(reg: Registry, since: int) -> set[str]:
    """Digests of the blobs the registry served after byte `since` of its log."""
    assert reg.log is not None
    text = reg.log.read_bytes()[since:].decode(errors="replace")
    return set(re.findall(r'GET /v2/[^ "]+/blobs/(sha256:[0-9a-f]{64})', text))


def layers_of(layout: Path) -> set[str]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][-1]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs/sha256" / digest).read_text())
    return {layer["digest"] for layer in manifest["layers"]}


def test_a_re_upgrade_fetches_only_the_new_layer(machine: dict[str, Path], registry: dict[str, object],
                                                 images: dict[str, Path]) -> None:
    """v2 is v1 plus one layer: after an upgrade to v1, the upgrade to v2 fetches that layer only
    (counted in the registry's log), and the cache then holds v2's blobs and nothing else."""
    reg = registry["reg"]
    assert isinstance(reg, Registry) and reg.log is not None
    proc = run_cli(*args_for(machine, "--no-verify", "-d", image_of(machine, NAME, registry, "red-0.1.0-amd64")))
    assert proc.returncode == 0, proc.stderr
    cache = machine["root"] / "var/tmp" / oci.CACHE_NAME
    assert layers_of(images["v1"]) <= set(oci.blob_sizes(cache))
    since = reg.log.stat().st_size
    proc = run_cli(*args_for(machine, "--no-verify", "-d", image_of(machine, NAME, registry, "red-0.2.0-amd64")))
    assert proc.returncode == 0, proc.stderr
    new_layers = layers_of(images["v2"]) - layers_of(images["v1"])
    assert len(new_layers) == 1
    fetched_layers = blob_gets(reg, since) & (layers_of(images["v1"]) | new_layers)
    assert fetched_layers == new_layers, "layers already in the cache were fetched again"
    assert re.search(r"fetched 3 blob\(s\), .*; 1 blob\(s\), [\d.]+ MiB reused from the layer cache", proc.stderr), \
        proc.stderr   # manifest, config and the new layer fetched; v1's one layer reused
    print(next(line for line in proc.stderr.splitlines() if "fetched" in line))
    assert "upgraded" in debugfs(machine["state"] / deploy.ACTIVE, "cat /etc/os-release")
    kept = set(oci.blob_sizes(cache))
    index = json.loads((cache / "index.json").read_text())
    assert len(index["manifests"]) == 1
    manifest = json.loads((cache / "blobs/sha256" / index["manifests"][0]["digest"].split(":", 1)[1]).read_text())
    assert kept == {index["manifests"][0]["digest"], manifest["config"]["digest"], *layers_of(images["v2"])}


def test_a_cache_without_room_is_dropped_first(machine: dict[str, Path], registry: dict[str, object]) -> None:
    cache = machine["root"] / "var/tmp" / oci.CACHE_NAME
    (cache / "blobs/sha256").mkdir(parents=True)
    (cache / "blobs/sha256" / ("cd" * 32)).write_bytes(b"stale")
    free = shutil.disk_usage(cache).free
    proc = subprocess.run([sys.executable, "-c", f"""
import logging, sys
from pathlib import Path
from runtime.upgrade import oci
logging.basicConfig(level=logging.INFO)
oci.make_room(Path({str(cache)!r}), {free})
"""], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "dropping the layer cache" in proc.stderr and not cache.exists()


def test_after_a_rollback_the_next_upgrade_replaces_active_and_keeps_passive(
        machine: dict[str, Path], registry: dict[str, object]) -> None:
    """The state cos-boot-assess leaves after a rollback: running passive (the old system),
    active.img the failed v2, its digest in failed-images.json, saved_entry=fallback. The
    channel skips v2 and picks v1: it replaces active; passive, the running system, stays."""
    reg, digests = registry["reg"], registry["digests"]
    assert isinstance(reg, Registry) and isinstance(digests, dict)
    m = machine
    assert run_cli(*args_for(m, "--no-verify", "-d", image_of(m, NAME, registry, "red-0.2.0-amd64"))).returncode == 0
    (m["state"] / upgrade_source.FAILED).write_text(json.dumps({"digests": [digests["v2"]]}))
    (m["root"] / "run/cos/passive_mode").touch()
    grubenv.update(m["oem"] / "grubenv", cos_trial=None, cos_tried=None, saved_entry="fallback")
    (m["root"] / "etc/cos").mkdir(parents=True)
    (m["root"] / "etc/cos/upgrade.yaml").write_text(f"repository: {reg.address}/{NAME}\ntags: red-*-amd64\n")
    proc = run_cli(*args_for(m, "--no-verify"))
    assert proc.returncode == 0, proc.stderr
    assert f"skipping {reg.address}/{NAME}:red-0.2.0-amd64" in proc.stderr
    assert f"newest in the channel: {reg.address}/{NAME}:red-0.1.0-amd64" in proc.stderr
    assert "running the passive system: it stays passive" in proc.stderr
    active, passive = m["state"] / deploy.ACTIVE, m["state"] / deploy.PASSIVE
    assert "0.1.0" in debugfs(active, "cat /etc/os-release") and "old-system" not in debugfs(active, "ls /etc")
    assert "yes" in debugfs(passive, "cat /etc/old-system"), "the running (good) passive was replaced"
    assert json.loads((m["state"] / "cOS/active.json").read_text())["digest"] == digests["v1"]
    env = grubenv.read(m["oem"] / "grubenv")
    assert env.get("cos_trial") == "1" and "saved_entry" not in env   # the new active is on trial, the default
