"""Boot an artifact in QEMU (TCG) and talk to it over the serial console.

The guest's ttyS0 is QEMU's stdio, read by a thread into a buffer. A session:
wait for the login prompt, log in as root/cos, run commands (each one's exit code
comes back on a marker line), power off. Every failure raises AssertionError with
the last serial lines, so the reason of a failed boot is in the test report.
Disks are opened with snapshot=on: a boot never changes the artifact (the raw disk's
grubenv must still say next_entry=recovery for the next test). The QEMU command line
comes from pipeline/vm.py (shared with `./dev run`): extra drives, NVMe / virtio-scsi
media, a NoCloud cidata ISO, restricted user networking with hostfwd/guestfwd.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.vm import (
    Drive,
    GuestForward,
    Machine,
    Network,
    cidata_iso,
    free_port,
    missing_tools,
    ovmf,
    qemu_command,
)

__all__ = ["VM", "Drive", "GuestForward", "Network", "cidata_iso", "free_port", "grown_copy", "missing_tools"]

TAIL_LINES = 60
BOOT_FAILED = (r"grub> |grub rescue> |Entering emergency mode|Kernel panic|"
               r"dracut: FATAL|Boot Failed|No bootable device|Give root password")
PROMPT = re.compile(r"^\S+@\S+:\S*[#$] *$")  # a bare shell prompt line
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-B]|\r")


@dataclass
class VM:
    drive: Drive
    firmware: str = "uefi"  # uefi (OVMF) | uefi-sb (OVMF, Secure Boot enforced) | bios (SeaBIOS)
    memory_mib: int = 2048
    name: str = "vm"
    extra: list[Drive] = field(default_factory=list)  # more disks / CD-ROMs (e.g. a cidata_iso)
    network: Network | None = None                    # None: no NIC
    reboot: bool = False                              # False: QEMU exits when the guest reboots
    proc: subprocess.Popen | None = None
    started: float = 0.0
    login_seconds: float | None = None
    _buf: bytearray = field(default_factory=bytearray)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seen: int = 0
    _tmp: tempfile.TemporaryDirectory | None = None
    _ids = itertools.count(1)

    # ---- lifecycle ----
    def machine(self) -> Machine:
        return Machine([self.drive, *self.extra], firmware=self.firmware, memory_mib=self.memory_mib,
                       network=self.network, reboot=self.reboot)

    def command(self, vars_file: Path | None) -> list[str]:
        return qemu_command(self.machine(), vars_file)

    def start(self, cmd: list[str] | None = None) -> "VM":
        """Start QEMU (or `cmd`, a command that runs QEMU on its stdio, e.g. ./dev run)."""
        self._tmp = tempfile.TemporaryDirectory(prefix=f"qemu-{self.name}-")
        vars_file = None
        if pair := ovmf(self.firmware):  # OVMF writes its variables: a private copy per boot
            vars_file = Path(self._tmp.name) / "OVMF_VARS.fd"
            shutil.copyfile(pair[1], vars_file)
        cmd = cmd or self.command(vars_file)
        print(f"[{self.name}] $ {' '.join(cmd)}", flush=True)
        self.started = time.monotonic()
        # its own process group: stop() ends QEMU too when `cmd` is a wrapper (./dev run)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                                     stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": self._tmp.name})
        threading.Thread(target=self._reader, daemon=True).start()
        return self

    def _reader(self) -> None:
        assert self.proc and self.proc.stdout
        while chunk := self.proc.stdout.read1(65536):
            with self._lock:
                self._buf += chunk

    def stop(self) -> None:
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)   # the group outlives a wrapper that exited
            except ProcessLookupError:
                pass
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

    def boot(self, timeout: float = 300) -> "VM":
        """start() and login(); QEMU is stopped when the boot does not reach a shell."""
        self.start()
        try:
            self.login(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

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

    def wait_exit(self, timeout: float, why: str) -> None:
        """Wait until QEMU exits (-no-reboot: the guest rebooted or powered off), else fail
        with `why` and the console; QEMU is stopped either way."""
        try:
            assert self.proc
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"{why} within {timeout:.0f} s") from None
        finally:
            self.stop()

    def poweroff(self, timeout: float = 120) -> None:
        self.send("poweroff")
        self.wait_exit(timeout, "did not power off")


def grown_copy(raw: Path, dest: Path, size: str) -> Path:
    """A sparse copy of a disk image, grown to `size` (truncate's syntax: "24G", "+4G"),
    so that a boot test's `layout` has room and the artifact stays as built."""
    subprocess.run(["cp", "--sparse=always", raw, dest], check=True)
    subprocess.run(["truncate", "-s", size, dest], check=True)
    return dest
