"""What every runtime tool works through: the target root, dry-run, one command runner.

On the device the root is "/"; the host tests pass a scratch directory. Paths the
tools touch are always made with System.path(), never by joining "/" by hand, so a
test can never write to the host's /etc.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("cos")

STDERR_TAIL_LINES = 15


class CosError(Exception):
    """A failure the user can act on: one line saying what, and a hint."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")


@dataclass
class System:
    root: Path = Path("/")
    dry_run: bool = False
    env: dict[str, str] = field(default_factory=dict)  # extra environment for commands

    @property
    def is_host_root(self) -> bool:
        return self.root.resolve() == Path("/")

    def path(self, p: str | Path) -> Path:
        """`p` (an absolute path on the target) inside the target root."""
        return self.root / str(p).lstrip("/")

    def run(self, cmd: Sequence[str | Path], *, check: bool = True, capture: bool = True,
            input: bytes | None = None, env: Mapping[str, str] | None = None,
            cwd: str | Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run one command; log it; raise CosError with stderr's tail on failure.
        In dry-run mode the command is only logged."""
        argv = [str(c) for c in cmd]
        if shutil.which(argv[0]) is None and not os.path.isabs(argv[0]):
            raise CosError(f"required tool '{argv[0]}' is not installed", "install it in the OS image")
        log.info("$ %s", shlex.join(argv))
        if self.dry_run:
            return subprocess.CompletedProcess(argv, 0, b"", b"")
        proc = subprocess.run(argv, input=input, capture_output=capture, cwd=cwd, timeout=timeout,
                              env={**os.environ, **self.env, **(env or {})})
        if check and proc.returncode != 0:
            tail = (proc.stderr or b"").decode(errors="replace").strip().splitlines()[-STDERR_TAIL_LINES:]
            raise CosError(f"'{Path(argv[0]).name}' exited {proc.returncode}: {shlex.join(argv)}"
                           + ("\n    " + "\n    ".join(tail) if tail else ""))
        return proc

    def run_logged(self, cmd: Sequence[str | Path], *, env: Mapping[str, str] | None = None,
                   cwd: str | Path | None = None) -> int:
        """Run one command with its stdout+stderr logged line by line as they come (a
        long command such as cos-deploy shows progress, and a reboot it triggers loses
        nothing already printed); returns the exit code. Dry-run: only logged, 0."""
        argv = [str(c) for c in cmd]
        if shutil.which(argv[0]) is None and not os.path.isabs(argv[0]):
            raise CosError(f"required tool '{argv[0]}' is not installed", "install it in the OS image")
        log.info("$ %s", shlex.join(argv))
        if self.dry_run:
            return 0
        with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              cwd=cwd, env={**os.environ, **self.env, **(env or {})}) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.info("  | %s", line.decode(errors="replace").rstrip("\n"))
        return proc.returncode


def write_atomic(path: Path, data: bytes, mode: int | None = None, owner: tuple[int, int] | None = None) -> None:
    """Write `path` under a temporary name in the same directory, then rename: a reader
    (or a power cut) sees the old file or the new one, never half of it. `owner` (uid, gid)
    is set on the temporary file, so the final name is never briefly root's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        elif path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o644)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
