"""Boot an artifact in QEMU (TCG) and talk to it over the serial console.

The guest's ttyS0 is QEMU's stdio, read by a thread into a buffer. A session:
wait for the login prompt, log in as root/cos, run commands (each one's exit code
comes back on a marker line), power off. Every failure raises AssertionError with
the last serial lines, so the reason of a failed boot is in the test report.
Disks are opened with snapshot=on: a boot never changes the artifact (the raw disk's
grubenv must still say next_entry=recovery for the next test).
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
QEMU = "qemu-system-x86_64"
TAIL_LINES = 60
BOOT_FAILED = (r"grub> |grub rescue> |Entering emergency mode|Kernel panic|"
               r"dracut: FATAL|Boot Failed|No bootable device|Give root password")
PROMPT = re.compile(r"^\S+@\S+:\S*[#$] *$")  # a bare shell prompt line
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-B]|\r")


def missing_tools(firmware: str) -> list[str]:
    """What this machine lacks to boot with `firmware` ('uefi' or 'bios')."""
    missing = [] if shutil.which(QEMU) else [f"{QEMU} (apt-get install qemu-system-x86)"]
    if firmware == "uefi" and not (OVMF_CODE.is_file() and OVMF_VARS.is_file()):
        missing.append(f"{OVMF_CODE} (apt-get install ovmf)")
    if firmware == "bios" and not SEABIOS.is_file():
        missing.append(f"{SEABIOS} (apt-get install seabios)")
    return missing


@dataclass
class Drive:
    path: Path
    media: str = "disk"     # disk (virtio) | cdrom (AHCI CD-ROM) | usb (usb-storage)
    format: str = "raw"
    snapshot: bool = True   # writes go to a temporary overlay, the artifact is never changed


@dataclass
class VM:
    drive: Drive
    firmware: str = "uefi"  # uefi (OVMF) | bios (SeaBIOS)
    memory_mib: int = 2048
    name: str = "vm"
    proc: subprocess.Popen | None = None
    started: float = 0.0
    login_seconds: float | None = None
    _buf: bytearray = field(default_factory=bytearray)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seen: int = 0
    _tmp: tempfile.TemporaryDirectory | None = None
    _ids = itertools.count(1)

    # ---- lifecycle ----
    def command(self, vars_file: Path | None) -> list[str]:
        cmd = [QEMU, "-accel", "tcg", "-machine", "q35", "-m", str(self.memory_mib), "-smp", "2",
               "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
               "-nic", "none"]
        if self.firmware == "uefi":
            cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}"]
        else:
            cmd += ["-bios", str(SEABIOS)]
        d = self.drive
        snap = "on" if d.snapshot else "off"
        if d.media == "cdrom":
            cmd += ["-drive", f"if=none,id=boot0,file={d.path},format={d.format},media=cdrom,readonly=on",
                    "-device", "ide-cd,drive=boot0,bootindex=0"]
        elif d.media == "usb":
            cmd += ["-device", "qemu-xhci,id=xhci",
                    "-drive", f"if=none,id=boot0,file={d.path},format={d.format},snapshot={snap}",
                    "-device", "usb-storage,bus=xhci.0,drive=boot0,removable=on,bootindex=0"]
        else:
            cmd += ["-drive", f"if=none,id=boot0,file={d.path},format={d.format},snapshot={snap}",
                    "-device", "virtio-blk-pci,drive=boot0,bootindex=0"]
        return cmd

    def start(self) -> "VM":
        self._tmp = tempfile.TemporaryDirectory(prefix=f"qemu-{self.name}-")
        vars_file = None
        if self.firmware == "uefi":  # OVMF writes its variables: a private copy per boot
            vars_file = Path(self._tmp.name) / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_file)
        cmd = self.command(vars_file)
        print(f"[{self.name}] $ {' '.join(cmd)}", flush=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": self._tmp.name})
        threading.Thread(target=self._reader, daemon=True).start()
        return self

    def _reader(self) -> None:
        assert self.proc and self.proc.stdout
        while chunk := self.proc.stdout.read1(65536):
            with self._lock:
                self._buf += chunk

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "VM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- console ----
    def text(self, start: int = 0) -> str:
        with self._lock:
            data = bytes(self._buf[start:])
        return ANSI.sub(b"", data).decode(errors="replace")

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def fail(self, why: str) -> AssertionError:
        return AssertionError(f"[{self.name}] {why}\n--- last serial lines ---\n{self.tail()}\n---")

    def send(self, line: str) -> None:
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, pattern: str, timeout: float, fail_on: str | None = None) -> re.Match:
        """Wait for `pattern` in the output after the last match; return the match.
        `fail_on` (a regex) stops waiting early: the boot went somewhere it cannot recover from."""
        regex = re.compile(pattern)
        bad = re.compile(fail_on) if fail_on else None
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.text(), self._seen)
            if m:
                self._seen = m.end()
                return m
            if bad and (b := bad.search(self.text(), self._seen)):
                time.sleep(2)  # let the reason reach the console
                raise self.fail(f"boot failed ({b.group(0).strip()!r}) while waiting for {pattern!r}")
            if self.proc and self.proc.poll() is not None:
                raise self.fail(f"QEMU exited ({self.proc.returncode}) while waiting for {pattern!r}")
            if time.monotonic() > deadline:
                raise self.fail(f"timed out after {timeout:.0f} s waiting for {pattern!r}")
            time.sleep(0.2)

    # ---- session ----
    def login(self, user: str = "root", password: str = "cos", timeout: float = 300) -> float:
        """Wait for the login prompt, log in; return seconds from QEMU start to the prompt."""
        self.expect(r"login: ", timeout, fail_on=BOOT_FAILED)
        self.login_seconds = time.monotonic() - self.started
        print(f"[{self.name}] login prompt after {self.login_seconds:.1f} s", flush=True)
        self.send(user)
        self.expect(r"[Pp]assword: ", 60)
        self.send(password)
        self.expect(r"# ", 60)
        self.run("stty -echo cols 500; dmesg -n 1", check=True)  # no echo, no wrap, no printk noise
        return self.login_seconds

    def run(self, command: str, timeout: float = 120, check: bool = True) -> str:
        """Run a shell command; return its output. The marker holds $? expanded, so the
        echoed command line (which shows '$?' literally) never matches it."""
        n = next(self._ids)
        self.send(f"{command}; echo \"@@{n}:$?@@\"")
        m = self.expect(rf"(?s)\n?(.*?)@@{n}:(\d+)@@", timeout)
        out, rc = m.group(1), int(m.group(2))
        lines = [ln for ln in out.splitlines()
                 if not ln.rstrip().endswith(f'"@@{n}:$?@@"') and not PROMPT.match(ln)]
        out = "\n".join(lines).strip()
        if check and rc != 0:
            raise self.fail(f"command {command!r} exited {rc}:\n{out}")
        return out

    def poweroff(self, timeout: float = 120) -> None:
        self.send("poweroff")
        try:
            assert self.proc
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"did not power off within {timeout} s") from None
