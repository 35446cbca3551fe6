"""pipeline/vm.py without booting an OS: QEMU really accepts the command lines it builds
(every drive medium, firmware, restricted NIC with forwards), the cidata ISO is a real
ISO 9660 volume labelled cidata holding the files, and the guestfwd relay carries bytes
both ways to a server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline import vm
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parent.parent
needs_qemu = pytest.mark.skipif(bool(vm.missing_tools("uefi") + vm.missing_tools("bios")),
                                reason="qemu-system-x86 / ovmf / seabios not installed")


def qemu_accepts(cmd: list[str], seconds: float = 3.0) -> None:
    """Start QEMU paused (-S): it parses and realizes every option and device first and
    exits at once on a bad one; still running after `seconds` = accepted."""
    proc = subprocess.Popen([*cmd, "-S"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=seconds)
        raise AssertionError(f"QEMU exited {proc.returncode}: {out.decode(errors='replace')}\n{cmd}")
    except subprocess.TimeoutExpired:
        pass
    finally:
        proc.kill()
        proc.wait()


@needs_qemu
@pytest.mark.parametrize("firmware", ["uefi", "bios"])
def test_qemu_accepts_every_medium_and_the_network(tmp_path, firmware):
    drives = []
    for n, media in enumerate(vm.MEDIA):
        img = tmp_path / f"d{n}.img"
        if media == "cdrom":
            img = vm.cidata_iso(tmp_path / f"seed{n}", "#cloud-config\n")
        else:
            subprocess.run(["truncate", "-s", "64M", img], check=True)
        drives.append(vm.Drive(img, media))
    second = tmp_path / "second.img"  # a second disk on the same virtio-scsi controller, persistent
    subprocess.run(["truncate", "-s", "64M", second], check=True)
    drives.append(vm.Drive(second, "scsi", snapshot=False))
    net = vm.Network(hostfwd={vm.free_port(): 22},
                     guestfwd=[vm.GuestForward("169.254.169.254", 80, vm.free_port())])
    vars_file = tmp_path / "vars.fd"
    shutil.copyfile(vm.OVMF_VARS, vars_file)
    cmd = vm.qemu_command(vm.Machine(drives, firmware=firmware, network=net), vars_file)
    assert "restrict=on" in cmd[cmd.index("-netdev") + 1]
    qemu_accepts(cmd)


def test_network_options():
    net = vm.Network(hostfwd={2222: 22}, guestfwd=[vm.GuestForward("10.0.2.100", 80, 8080)])
    netdev = vm.network_args(net)[1].split(",")
    assert netdev[:3] == ["user", "id=net0", "restrict=on"]
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in netdev
    assert not any(o.startswith("net=") for o in netdev)  # 10.0.2.100 is in slirp's own network
    metadata = vm.Network(guestfwd=[vm.GuestForward("169.254.169.254", 80, 8080)])
    assert "net=169.254.0.0/16" in vm.network_args(metadata)[1].split(",")
    with pytest.raises(PipelineError, match="not all in"):
        vm.network_args(vm.Network(guestfwd=[vm.GuestForward("10.0.2.100", 80, 1),
                                             vm.GuestForward("169.254.169.254", 80, 2)]))
    assert vm.network_args(None) == ["-nic", "none"]


def test_bad_machine_is_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="unknown media 'floppy'"):
        vm.qemu_command(vm.Machine([vm.Drive(tmp_path / "x", "floppy")], firmware="bios"))
    with pytest.raises(PipelineError, match="unknown firmware"):
        vm.qemu_command(vm.Machine([vm.Drive(tmp_path / "x")], firmware="coreboot"))


def test_cidata_iso_is_labelled_and_holds_the_files(tmp_path):
    iso = vm.cidata_iso(tmp_path, "#cloud-config\nhostname: x\n", "instance-id: i-1\n")
    assert iso == tmp_path / "cidata.iso" and not list(tmp_path.glob(".*tmp"))
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", iso], capture_output=True, text=True, check=False)
    assert label.stdout.strip() == "cidata"
    for name, want in (("user-data", "#cloud-config\nhostname: x\n"), ("meta-data", "instance-id: i-1\n")):
        got = subprocess.run(["xorriso", "-indev", iso, "-osirrox", "on", "-extract", f"/{name}",
                              tmp_path / name], capture_output=True, check=False)
        assert got.returncode == 0, got.stderr
        assert (tmp_path / name).read_text() == want


def test_guestfwd_relay_carries_both_ways(tmp_path):
    """What slirp runs per guest connection: stdin/stdout is the guest's socket."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n\n"):
                data += conn.recv(100)
            conn.sendall(b"echo:" + data)

    threading.Thread(target=serve, daemon=True).start()
    guest, relay_end = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.vm", "forward", str(port)], cwd=REPO,
                            stdin=relay_end, stdout=relay_end, env={**os.environ, "PYTHONPATH": str(REPO)})
    relay_end.close()
    guest.sendall(b"GET / HTTP/1.0\n\n")
    guest.shutdown(socket.SHUT_WR)
    guest.settimeout(20)
    reply = b""
    while chunk := guest.recv(100):
        reply += chunk
    assert reply == b"echo:GET / HTTP/1.0\n\n"
    assert proc.wait(timeout=20) == 0
    server.close()


def test_forward_command_runs_this_module():
    argv = vm.forward_command(1234)
    assert "pipeline.vm forward 1234" in argv and "," not in argv.replace(",,", "")


# ---- ./dev run: arguments, errors, and the machine it boots ----

def dev_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "dev"), "run", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, check=False)


def fake_build(build_dir: Path, kind: str = "raw", size: str = "64M") -> Path:
    """A manifest naming an artifact, as the pipeline leaves it (the content is not booted)."""
    flavor_dir = build_dir / "red"
    flavor_dir.mkdir(parents=True)
    artifact = flavor_dir / f"red.{kind}"
    subprocess.run(["truncate", "-s", size, artifact], check=True)
    with open(artifact, "r+b") as f:
        f.write(b"cOS!")
    (flavor_dir / "manifest.json").write_text(
        json.dumps({"flavor": "red", "artifacts": [{"kind": kind, "path": artifact.name}]}))
    return artifact


@pytest.mark.parametrize("media,task", [("--disk", "build-red:raw"), ("--iso", "build-red:iso")])
def test_dev_run_names_the_task_when_not_built(tmp_path, media, task):
    proc = dev_run("red", media, env={"COS_BUILD_DIR": str(tmp_path)})
    assert proc.returncode == 2, proc
    assert "is not built yet" in proc.stderr and f"./dev doit {task}" in proc.stderr


def test_dev_run_names_the_apt_package_when_qemu_is_missing(tmp_path):
    for tool in ("bash", "dirname"):  # what ./dev itself needs, and no QEMU
        (tmp_path / tool).symlink_to(shutil.which(tool))
    proc = dev_run("red", env={"PATH": str(tmp_path)})
    assert proc.returncode == 2
    assert "qemu-system-x86_64 (apt-get install qemu-system-x86)" in proc.stderr


def test_dev_run_names_the_apt_package_when_ovmf_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vm, "OVMF_CODE", tmp_path / "OVMF_CODE_4M.fd")
    assert vm.main(["run", "red", "--uefi"]) == 2
    assert "(apt-get install ovmf)" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--iso", "--persistent", "x.raw"], "use it with --disk"),
    (["--user-data", "/nonexistent/user-data"], "--user-data /nonexistent/user-data: cannot read it"),
])
def test_dev_run_bad_arguments(tmp_path, args, message):
    fake_build(tmp_path)
    proc = dev_run("red", *args, env={"COS_BUILD_DIR": str(tmp_path)})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert sorted(p.name for p in (tmp_path / "red").iterdir()) == ["manifest.json", "red.raw"]


@pytest.mark.parametrize("args", [["--disk", "--iso"], ["--uefi", "--bios"], ["--ssh-port", "70000"]])
def test_dev_run_refuses_conflicting_options(args):
    proc = dev_run("red", *args)
    assert proc.returncode == 2 and "usage:" in proc.stderr


@needs_qemu
def test_dev_run_machine_persistent_copy_cidata_and_ssh(tmp_path, monkeypatch):
    artifact = fake_build(tmp_path / "build")
    monkeypatch.setenv("COS_BUILD_DIR", str(tmp_path / "build"))
    user_data = tmp_path / "my.yaml"
    user_data.write_text("#cloud-config\nhostname: tried\n")
    keep = tmp_path / "keep" / "red.raw"
    opts = vm.RunOptions("red", "disk", "uefi", user_data, keep, ssh_port=vm.free_port())
    work = tmp_path / "work"
    work.mkdir()
    machine, vars_file = vm.run_machine(opts, work)
    boot, seed = machine.drives
    assert boot == vm.Drive(keep, snapshot=False) and seed.media == "cdrom"
    assert keep.read_bytes()[:4] == b"cOS!" and keep.stat().st_blocks * 512 < 1 << 20  # sparse copy
    assert vars_file == keep.with_name("red.raw.OVMF_VARS.fd") and vars_file.is_file()
    assert machine.network and machine.network.hostfwd == {opts.ssh_port: 22} and machine.reboot
    cmd = vm.qemu_command(machine, vars_file)
    assert f"hostfwd=tcp:127.0.0.1:{opts.ssh_port}-:22" in cmd[cmd.index("-netdev") + 1]
    qemu_accepts(cmd)
    # the user's changes stay: a later run boots the same copy, the artifact is untouched
    with open(keep, "r+b") as f:
        f.write(b"mine")
    vm.run_machine(opts, work)
    assert keep.read_bytes()[:4] == b"mine" and artifact.read_bytes()[:4] == b"cOS!"
    plain, _ = vm.run_machine(vm.RunOptions("red", firmware="bios"), work)
    assert plain.drives == [vm.Drive(artifact)] and plain.drives[0].snapshot
    assert plain.accel == "tcg"   # KVM only with --kvm (nested KVM hangs guests)


def test_kvm_is_opt_in_and_only_where_it_runs_the_firmware():
    """--kvm keeps KVM only where QEMU runs that firmware with it (on this project's CI
    machine OVMF under KVM stops with "KVM internal error"; test_dev_run_boots_the_iso_on_its_stdio
    hung on that when KVM was the default)."""
    for firmware in ("bios", "uefi"):
        assert vm.accel(vm.RunOptions("red", firmware=firmware)) == "tcg"
        usable = vm.kvm_usable(firmware)
        assert vm.accel(vm.RunOptions("red", firmware=firmware, kvm=True)) == ("kvm" if usable else "tcg")
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            assert not usable


@pytest.mark.slow
@pytest.mark.boot
def test_dev_run_boots_the_iso_on_its_stdio(flavor_build, flavor_paths):
    """`./dev run <flavor> --iso --bios` as a user runs it, stdin/stdout a pipe instead of a
    terminal: the serial console reaches the login prompt, the ISO boots live from a CD-ROM
    under SeaBIOS (test_boot's BIOS ISO boot), the NIC has its DHCP address, and poweroff
    ends QEMU with 0 (reboots would stay inside it)."""
    from tests.qemu import VM
    from tests.test_boot import check_live
    console = VM(vm.Drive(Path("-")), firmware="bios", name="dev-run")  # firmware: no OVMF copy needed
    console.start(cmd=[str(REPO / "dev"), "run", flavor_paths.flavor.name, "--iso", "--bios"])
    try:
        console.login(timeout=400)
        check_live(console)
        console.run("timeout 180 /usr/lib/systemd/systemd-networkd-wait-online --any", timeout=210)
        assert "inet 10.0.2.15/24" in console.run("ip -4 -o addr show scope global")
        console.poweroff()
        assert console.proc and console.proc.returncode == 0
    finally:
        console.stop()
