"""Boot a built artifact in QEMU: the command line shared by `./dev run` and the tests.

`./dev run red --disk|--iso [--uefi|--secure-boot|--bios] [--user-data FILE] [--persistent PATH]
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
# Secure Boot: Debian's SMM build (.ms.fd links to .secboot.fd) and a variable store with
# Microsoft's KEK/db enrolled and Secure Boot on, as a shim-signed distro expects.
OVMF_SB_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd")
OVMF_SB_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
FIRMWARES = ("uefi", "uefi-sb", "bios")
SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
QEMU = "qemu-system-x86_64"
MEDIA = ("disk", "cdrom", "usb", "nvme", "scsi")
SLIRP_NET = ipaddress.IPv4Network("10.0.2.0/24")        # QEMU's default user network
LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")     # cloud metadata addresses live here
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
    firmware: str = "uefi"              # uefi (OVMF) | uefi-sb (OVMF, Secure Boot) | bios (SeaBIOS)
    memory_mib: int = 2048
    cpus: int = 0                       # 0: 2 with KVM, 1 under TCG (measured faster: one vCPU thread)
    accel: str = "tcg"                  # tcg | kvm
    network: Network | None = None      # None: no NIC at all
    reboot: bool = False                # False: QEMU exits when the guest reboots (-no-reboot)
    interactive: bool = False           # serial + QEMU monitor (Ctrl-A) on a terminal's stdio


def ovmf(firmware: str) -> tuple[Path, Path] | None:
    """OVMF's code and variable-store template for a UEFI `firmware`, None for bios."""
    return {"uefi": (OVMF_CODE, OVMF_VARS), "uefi-sb": (OVMF_SB_CODE, OVMF_SB_VARS)}.get(firmware)


def missing_tools(firmware: str) -> list[str]:
    """What this machine lacks to boot with `firmware` (uefi, uefi-sb, bios), with the apt package."""
    missing = [] if shutil.which(QEMU) else [f"{QEMU} (apt-get install qemu-system-x86)"]
    pair = ovmf(firmware)
    if pair and not all(p.is_file() for p in pair):
        missing.append(f"{' and '.join(map(str, pair))} (apt-get install ovmf)")
    if firmware == "bios" and not SEABIOS.is_file():
        missing.append(f"{SEABIOS} (apt-get install seabios)")
    return missing


def kvm_usable(firmware: str) -> bool:
    """/dev/kvm can be opened AND QEMU runs `firmware` under KVM: a nested or half-supported
    KVM opens fine, may even start a paused vCPU, and then stops the guest with "KVM internal
    error" (measured here: OVMF's first instructions, run from its flash). So the firmware runs
    for a few seconds, no disk, and QEMU must not report that."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return False
    with tempfile.TemporaryDirectory(prefix="cos-kvm-probe-") as tmp:
        pair = ovmf(firmware)
        vars_file = Path(tmp) / "vars.fd"
        if pair:
            shutil.copyfile(pair[1], vars_file)
        cmd = qemu_command(Machine([], firmware=firmware, accel="kvm", memory_mib=256, cpus=1), vars_file)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        except OSError:
            return False
        try:
            _, err = proc.communicate(timeout=KVM_PROBE_SECONDS)
            return proc.returncode == 0 and b"KVM internal error" not in err   # exited by itself: odd but clean
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            return b"error" not in err.lower()   # "KVM internal error" among them


KVM_PROBE_SECONDS = 3


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
        snapshot = "on" if d.snapshot else "off"
        args += ["-drive", f"if=none,id={ident},file={_opt(d.path)},format={d.format},snapshot={snapshot}"]
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
    """The whole QEMU command line. `vars_file`: a writable copy of the OVMF variables (uefi*).
    Secure Boot OVMF is an SMM build: it needs SMM on, its flash secured (only SMM code may
    write the variables) and S3 off, as libvirt runs it."""
    secure = m.firmware == "uefi-sb"
    cmd = [QEMU, "-accel", m.accel, "-machine", "q35,smm=on" if secure else "q35", "-m", str(m.memory_mib), "-smp", str(m.cpus or (2 if m.accel == "kvm" else 1)),
           "-display", "none"]
    if m.accel == "kvm":
        cmd += ["-cpu", "host"]
    # interactive: Ctrl-A X quits, Ctrl-A C reaches the monitor; else serial alone on stdio
    cmd += ["-serial", "mon:stdio"] if m.interactive else ["-monitor", "none", "-serial", "stdio"]
    if not m.reboot:
        cmd.append("-no-reboot")
    cmd += network_args(m.network)
    pair = ovmf(m.firmware)
    if pair:
        if vars_file is None:
            raise PipelineError("UEFI boot needs a writable copy of OVMF_VARS (vars_file)")
        if secure:
            cmd += ["-global", "driver=cfi.pflash01,property=secure,value=on",
                    "-global", "ICH9-LPC.disable_s3=1"]
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={pair[0]}",
                "-drive", f"if=pflash,format=raw,unit=1,file={_opt(vars_file)}"]
    elif m.firmware == "bios":
        cmd += ["-bios", str(SEABIOS)]
    else:
        raise PipelineError(f"unknown firmware {m.firmware!r}", f"use one of {', '.join(FIRMWARES)}")
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
                          capture_output=True, text=True, check=False)
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



# ---- ./dev run: boot a built artifact on the user's terminal ----

ARTIFACT_KINDS = {"disk": "raw", "iso": "iso"}   # --disk / --iso -> manifest kind = doit task


@dataclass
class RunOptions:
    flavor: str
    media: str = "disk"                 # disk | iso
    firmware: str = "uefi"
    user_data: Path | None = None
    persistent: Path | None = None
    ssh_port: int | None = None
    memory_mib: int = 2048
    kvm: bool = False                   # opt-in: a KVM that passes the probe can still hang a kernel


def find_artifact(flavor: str, media: str) -> Path:
    """The flavor's built raw disk or ISO, from its manifest; else say which task builds it."""
    from . import manifest
    from .config import FlavorPaths, load_flavor
    kind = ARTIFACT_KINDS[media]
    paths = FlavorPaths(load_flavor(flavor))
    entry = manifest.artifact(paths.manifest, kind) if paths.manifest.is_file() else None
    path = paths.build / entry["path"] if entry else None
    if path is None or not path.is_file():
        raise PipelineError(f"{flavor}: the {'raw disk' if media == 'disk' else 'ISO'} is not built yet"
                            + (f" ({path} is missing)" if path else ""),
                            f"build it: ./dev doit build-{flavor}:{kind}  (or ./dev build {flavor})")
    return path


def persistent_copy(artifact: Path, target: Path) -> Path:
    """First run: a sparse copy of the artifact (temporary name, renamed when complete);
    later runs: the copy as the user left it."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    proc = subprocess.run(["cp", "--sparse=always", str(artifact), str(tmp)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise PipelineError(f"cannot copy {artifact} to {target}: {proc.stderr.strip()}")
    tmp.rename(target)
    print(f"dev run: made {target} from {artifact.name}; later runs boot this copy", file=sys.stderr)
    return target


def run_machine(opts: RunOptions, workdir: Path) -> tuple[Machine, Path | None]:
    """Everything checked before anything is written; returns the machine and its vars file."""
    if missing := missing_tools(opts.firmware):
        raise PipelineError("cannot boot: missing " + ", ".join(missing))
    if opts.persistent and opts.media != "disk":
        raise PipelineError("--persistent keeps a copy of the raw disk: use it with --disk")
    user_data = None
    if opts.user_data:
        try:
            user_data = opts.user_data.read_text()
        except OSError as exc:
            raise PipelineError(f"--user-data {opts.user_data}: cannot read it ({exc.strerror})") from None
    artifact = find_artifact(opts.flavor, opts.media)
    if opts.media == "iso":
        drives = [Drive(artifact, "cdrom")]
    elif opts.persistent:
        drives = [Drive(persistent_copy(artifact, opts.persistent), snapshot=False)]
    else:
        drives = [Drive(artifact)]  # snapshot: the artifact is never changed
    if user_data is not None:
        drives.append(Drive(cidata_iso(workdir, user_data), "cdrom"))
    vars_file = None
    if pair := ovmf(opts.firmware):  # OVMF's variables: kept beside a persistent disk, else per run
        name = "OVMF_SB_VARS.fd" if opts.firmware == "uefi-sb" else "OVMF_VARS.fd"  # the stores differ
        vars_file = (opts.persistent.with_name(f"{opts.persistent.name}.{name}") if opts.persistent
                     else workdir / name)
        if not vars_file.exists():
            shutil.copyfile(pair[1], vars_file)
    network = Network(hostfwd={opts.ssh_port: 22} if opts.ssh_port else {})
    machine = Machine(drives, firmware=opts.firmware, memory_mib=opts.memory_mib,
                      accel=accel(opts), network=network, reboot=True, interactive=True)
    return machine, vars_file


def accel(opts: RunOptions) -> str:
    """TCG unless --kvm. Not KVM by default: nested KVM (CI runners, VMs) passes the probe
    and still hangs (measured here: OVMF stopped with "KVM internal error"; SeaBIOS and GRUB
    ran, then the kernel printed nothing), where TCG is slow but always boots."""
    if not opts.kvm:
        return "tcg"
    if kvm_usable(opts.firmware):
        return "kvm"
    print(f"dev run: KVM does not run {opts.firmware} firmware here (no /dev/kvm, or QEMU stops it); using TCG",
          file=sys.stderr)
    return "tcg"


def run(opts: RunOptions) -> int:
    with tempfile.TemporaryDirectory(prefix="cos-run-") as tmp:
        machine, vars_file = run_machine(opts, Path(tmp))
        cmd = qemu_command(machine, vars_file)
        ssh = f"; ssh -p {opts.ssh_port} root@127.0.0.1" if opts.ssh_port else ""
        print(f"dev run: {opts.flavor} {opts.media} ({opts.firmware}, {machine.accel}); serial console below, "
              f"Ctrl-A X quits{ssh}\n$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        return subprocess.run(cmd, check=False).returncode


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="boot a built artifact in QEMU on this terminal")
    p.add_argument("flavor")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--disk", dest="media", action="store_const", const="disk", help="the raw disk (default)")
    media.add_argument("--iso", dest="media", action="store_const", const="iso", help="the live ISO")
    fw = p.add_mutually_exclusive_group()
    fw.add_argument("--uefi", dest="firmware", action="store_const", const="uefi", help="OVMF (default)")
    fw.add_argument("--secure-boot", dest="firmware", action="store_const", const="uefi-sb",
                    help="OVMF with Secure Boot enforced (Microsoft's keys enrolled)")
    fw.add_argument("--bios", dest="firmware", action="store_const", const="bios", help="SeaBIOS")
    p.add_argument("--user-data", type=Path, metavar="FILE", help="cloud-config, handed over as NoCloud cidata")
    p.add_argument("--persistent", type=Path, metavar="PATH",
                   help="boot a copy of the disk kept at PATH (made on first use, reused later)")
    p.add_argument("--ssh-port", type=int, metavar="N", help="forward 127.0.0.1:N to the guest's port 22")
    p.add_argument("--memory", type=int, default=2048, metavar="MIB")
    p.add_argument("--kvm", action="store_true",
                   help="use KVM when it runs the firmware here (default: TCG, which always works)")
    p.set_defaults(media="disk", firmware="uefi")

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.vm")
    sub = parser.add_subparsers(dest="command", required=True)
    fwd = sub.add_parser("forward", help="(internal) relay stdin/stdout to 127.0.0.1:PORT, for guestfwd")
    fwd.add_argument("port", type=int)
    _run_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "forward":
        forward(args.port)
        return 0
    if args.ssh_port is not None and not 0 < args.ssh_port < 65536:
        parser.error(f"--ssh-port {args.ssh_port}: not a TCP port")
    try:
        return run(RunOptions(args.flavor, args.media, args.firmware, args.user_data, args.persistent,
                              args.ssh_port, args.memory, args.kvm))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
