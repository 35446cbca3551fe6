"""Boot a built artifact in QEMU: the command line shared by `./dev run` and the tests.

`./dev run red --disk|--iso [--uefi|--bios] [--user-data FILE] [--persistent PATH]
[--ssh-port N]` (= `python -m pipeline.vm run ...`) boots the flavor's raw disk or ISO
with the serial console on the terminal, like `mkosi qemu`. tests/qemu.py drives the
same command from pytest.

Networking is QEMU user mode with restrict=on: the guest reaches nothing but what is
forwarded explicitly (hostfwd on 127.0.0.1, guestfwd to 127.0.0.1), never the outside.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import selectors
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PipelineError

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
QEMU = "qemu-system-x86_64"
MEDIA = ("disk", "cdrom", "usb", "nvme", "scsi")
SLIRP_NET = ipaddress.ip_network("10.0.2.0/24")        # QEMU's default user network
LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")     # cloud metadata addresses live here
DEFAULT_META_DATA = "instance-id: cos-local\n"


@dataclass(frozen=True)
class Drive:
    path: Path
    media: str = "disk"     # disk (virtio-blk) | cdrom (AHCI CD-ROM) | usb | nvme | scsi (virtio-scsi)
    format: str = "raw"
    snapshot: bool = True   # writes go to a temporary overlay, the file is never changed


@dataclass(frozen=True)
class GuestForward:
    """Guest TCP connections to guest_ip:guest_port are carried to 127.0.0.1:host_port."""
    guest_ip: str
    guest_port: int
    host_port: int


@dataclass
class Network:
    """One virtio NIC on restricted user-mode networking (DHCP gives the guest .15)."""
    hostfwd: dict[int, int] = field(default_factory=dict)   # 127.0.0.1:<host port> -> guest <port>
    guestfwd: list[GuestForward] = field(default_factory=list)

    def subnet(self) -> ipaddress.IPv4Network:
        """slirp serves guestfwd only for addresses inside its own network; an address
        outside it would be connected to for real. 169.254.169.254 therefore needs the
        user network moved to 169.254.0.0/16."""
        addrs = [ipaddress.ip_address(f.guest_ip) for f in self.guestfwd]
        for net in (SLIRP_NET, LINK_LOCAL):
            if all(a in net for a in addrs):
                return net
        raise PipelineError(f"guestfwd addresses {[str(a) for a in addrs]} are not all in "
                            f"{SLIRP_NET} or all in {LINK_LOCAL}",
                            "forward only addresses of one of those networks")


@dataclass
class Machine:
    drives: list[Drive]                 # the first one boots
    firmware: str = "uefi"              # uefi (OVMF) | bios (SeaBIOS)
    memory_mib: int = 2048
    cpus: int = 2
    accel: str = "tcg"                  # tcg | kvm
    network: Network | None = None      # None: no NIC at all
    reboot: bool = False                # False: QEMU exits when the guest reboots (-no-reboot)
    interactive: bool = False           # serial + QEMU monitor (Ctrl-A) on a terminal's stdio


def missing_tools(firmware: str) -> list[str]:
    """What this machine lacks to boot with `firmware` ('uefi' or 'bios'), with the apt package."""
    missing = [] if shutil.which(QEMU) else [f"{QEMU} (apt-get install qemu-system-x86)"]
    if firmware == "uefi" and not (OVMF_CODE.is_file() and OVMF_VARS.is_file()):
        missing.append(f"{OVMF_CODE} (apt-get install ovmf)")
    if firmware == "bios" and not SEABIOS.is_file():
        missing.append(f"{SEABIOS} (apt-get install seabios)")
    return missing


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for hostfwd or a local server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _opt(value: str | Path) -> str:
    """QEMU option values escape a comma by doubling it."""
    return str(value).replace(",", ",,")


def drive_args(drives: list[Drive]) -> list[str]:
    """-drive/-device pairs; the first drive gets bootindex=0, controllers added once."""
    args: list[str] = []
    controllers: set[str] = set()
    for n, d in enumerate(drives):
        if d.media not in MEDIA:
            raise PipelineError(f"drive {d.path}: unknown media {d.media!r}", f"use one of {', '.join(MEDIA)}")
        boot = ",bootindex=0" if n == 0 else ""
        ident = f"drive{n}"
        if d.media == "cdrom":
            args += ["-drive", f"if=none,id={ident},file={_opt(d.path)},format={d.format},media=cdrom,readonly=on",
                     "-device", f"ide-cd,drive={ident}{boot}"]
            continue
        args += ["-drive", f"if=none,id={ident},file={_opt(d.path)},format={d.format},"
                           f"snapshot={'on' if d.snapshot else 'off'}"]
        if d.media == "usb":
            if "usb" not in controllers:
                args += ["-device", "qemu-xhci,id=xhci"]
            args += ["-device", f"usb-storage,bus=xhci.0,drive={ident},removable=on{boot}"]
        elif d.media == "nvme":
            args += ["-device", f"nvme,drive={ident},serial=cos{n}{boot}"]
        elif d.media == "scsi":
            if "scsi" not in controllers:
                args += ["-device", "virtio-scsi-pci,id=scsi"]
            args += ["-device", f"scsi-hd,bus=scsi.0,drive={ident}{boot}"]
        else:
            args += ["-device", f"virtio-blk-pci,drive={ident}{boot}"]
        controllers.add(d.media)
    return args


def forward_command(host_port: int) -> str:
    """What slirp runs per guest connection (its stdin/stdout are the connection): this
    module's `forward`, which relays to 127.0.0.1:host_port. A command, not a tcp chardev,
    because a chardev is one stream for QEMU's lifetime and HTTP clients open several."""
    repo = Path(__file__).resolve().parent.parent
    return shlex.join(["env", f"PYTHONPATH={repo}", sys.executable, "-m", "pipeline.vm",
                       "forward", str(host_port)])


def network_args(net: Network | None) -> list[str]:
    if net is None:
        return ["-nic", "none"]
    subnet = net.subnet()
    opts = ["user", "id=net0", "restrict=on"]
    if subnet != SLIRP_NET:
        opts.append(f"net={subnet}")
    opts += [f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in net.hostfwd.items()]
    opts += [f"guestfwd=tcp:{f.guest_ip}:{f.guest_port}-cmd:{_opt(forward_command(f.host_port))}"
             for f in net.guestfwd]
    return ["-netdev", ",".join(opts), "-device", "virtio-net-pci,netdev=net0"]


def qemu_command(m: Machine, vars_file: Path | None = None) -> list[str]:
    """The whole QEMU command line. `vars_file`: a writable copy of OVMF_VARS (uefi)."""
    cmd = [QEMU, "-accel", m.accel, "-machine", "q35", "-m", str(m.memory_mib), "-smp", str(m.cpus),
           "-display", "none"]
    if m.accel == "kvm":
        cmd += ["-cpu", "host"]
    # interactive: Ctrl-A X quits, Ctrl-A C reaches the monitor; else serial alone on stdio
    cmd += ["-serial", "mon:stdio"] if m.interactive else ["-monitor", "none", "-serial", "stdio"]
    if not m.reboot:
        cmd.append("-no-reboot")
    cmd += network_args(m.network)
    if m.firmware == "uefi":
        if vars_file is None:
            raise PipelineError("UEFI boot needs a writable copy of OVMF_VARS (vars_file)")
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={_opt(vars_file)}"]
    elif m.firmware == "bios":
        cmd += ["-bios", str(SEABIOS)]
    else:
        raise PipelineError(f"unknown firmware {m.firmware!r}", "use uefi or bios")
    return cmd + drive_args(m.drives)


def cidata_iso(directory: Path, user_data: str, meta_data: str = DEFAULT_META_DATA) -> Path:
    """A NoCloud seed: an ISO 9660 volume labelled `cidata` holding user-data and
    meta-data, made without mounts; written to a temporary name, renamed when complete."""
    directory = Path(directory)
    src = directory / "cidata"
    src.mkdir(parents=True, exist_ok=True)
    (src / "user-data").write_text(user_data)
    (src / "meta-data").write_text(meta_data)
    out, tmp = directory / "cidata.iso", directory / ".cidata.iso.tmp"
    tmp.unlink(missing_ok=True)
    if shutil.which("xorriso"):
        cmd = ["xorriso", "-as", "mkisofs"]
    elif shutil.which("genisoimage"):
        cmd = ["genisoimage"]
    else:
        raise PipelineError("cannot make the NoCloud cidata ISO: neither xorriso nor genisoimage is installed",
                            "apt-get install xorriso")
    proc = subprocess.run([*cmd, "-quiet", "-V", "cidata", "-J", "-r", "-o", str(tmp), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise PipelineError(f"{cmd[0]} failed making {out}: {proc.stderr.strip()[-500:]}")
    tmp.rename(out)
    return out


# ---- per-connection relay used by guestfwd (python -m pipeline.vm forward PORT) ----

def forward(host_port: int) -> None:
    """Relay stdin/stdout (the guest's connection, a socket from slirp) to 127.0.0.1:host_port."""
    guest = socket.socket(fileno=os.dup(0))
    host = socket.create_connection(("127.0.0.1", host_port), timeout=10)
    host.settimeout(None)
    guest.setblocking(False)
    host.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(guest, selectors.EVENT_READ, host)
    sel.register(host, selectors.EVENT_READ, guest)
    open_ends = 2
    while open_ends:
        for key, _ in sel.select():
            src, dst = key.fileobj, key.data
            data = src.recv(65536)  # type: ignore[union-attr]
            if data:
                _send_all(dst, data)
                continue
            sel.unregister(src)
            open_ends -= 1
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def _send_all(sock: socket.socket, data: bytes) -> None:
    sock.setblocking(True)
    try:
        sock.sendall(data)
    finally:
        sock.setblocking(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.vm")
    sub = parser.add_subparsers(dest="command", required=True)
    fwd = sub.add_parser("forward", help="(internal) relay stdin/stdout to 127.0.0.1:PORT, for guestfwd")
    fwd.add_argument("port", type=int)
    args = parser.parse_args(argv)
    if args.command == "forward":
        forward(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
