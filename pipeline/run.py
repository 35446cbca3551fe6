"""The one subprocess wrapper: log the command, raise a clear error on failure.
run() for a command that runs to its end; stream() for one whose stdin or stdout
this process works on while it runs (a pipeline: docker export | tar2sqfs, zstd | hash)."""
from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

from .errors import PipelineError, ToolMissing

log = logging.getLogger("cos.run")

# Debian package that ships each tool we call; used only for the error hint.
TOOL_PACKAGES = {
    "tar2sqfs": "squashfs-tools-ng",
    "sqfsdiff": "squashfs-tools-ng",
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "mmdebstrap": "mmdebstrap",
    "xorriso": "xorriso",
    "mkfs.vfat": "dosfstools",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mdir": "mtools",
    "rdsquashfs": "squashfs-tools-ng",
    "mcopy": "mtools",
    "mmd": "mtools",
    "sgdisk": "gdisk",
    "sfdisk": "fdisk",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "grub-mkimage": "grub-common",
    "grub-mkstandalone": "grub-common",
    "grub-mkrescue": "grub-common",
    "dockerd": "docker.io",
    "zstd": "zstd",
    "xz": "xz-utils",
}

STDERR_TAIL_LINES = 25


def require_tool(name: str) -> str:
    """Return the tool's path or raise naming the tool and how to install it."""
    path = shutil.which(name)
    if path is None:
        package = TOOL_PACKAGES.get(name)
        hint = (f"install it: apt-get install {package} (or run ./dev setup)"
                if package else "install it and make sure it is on PATH")
        raise ToolMissing(f"required tool '{name}' was not found on PATH", hint)
    return path


def run(
    cmd: Sequence[str | Path],
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: IO[bytes] | int | None = None,
    stdout: IO[bytes] | int | None = None,
    capture: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run one command; log it; on failure raise PipelineError with stderr's tail.

    stderr is always captured so a failure can show why; stdout is captured
    only when asked (capture=True) or redirected by the caller.
    """
    argv = [str(c) for c in cmd]
    require_tool(argv[0])
    log.info("$ %s", shlex.join(argv))
    proc = subprocess.run(
        argv, cwd=cwd, env=None if env is None else dict(env), stdin=stdin,
        stdout=subprocess.PIPE if capture else stdout, stderr=subprocess.PIPE,
    )
    if check and proc.returncode != 0:
        raise command_failed(argv, proc.returncode, proc.stderr)
    return proc


T = TypeVar("T")


def stream(cmd: Sequence[str | Path], *, feed: Callable[[IO[bytes]], T] | None = None,
           drain: Callable[[IO[bytes]], T] | None = None) -> T:
    """Run one command while `feed` writes its stdin or `drain` reads its stdout (exactly
    one of them), in this process; returns what that function returns.

    If the function fails (a bad archive, a full disk under the output), the child is
    killed, not waited for: it may be blocked on the full pipe and would never end. A
    child that exits non-zero (also when it died first and the feed hit a broken pipe)
    raises like run(), with its stderr's tail.
    """
    if (feed is None) == (drain is None):
        raise TypeError("stream() takes exactly one of feed= and drain=")
    argv = [str(c) for c in cmd]
    require_tool(argv[0])
    with tempfile.TemporaryFile() as errlog:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if feed else None,
                                stdout=subprocess.PIPE if drain else None, stderr=errlog)
        pipe = proc.stdin if feed else proc.stdout
        assert pipe is not None

        def failed() -> PipelineError:
            errlog.seek(0)
            return command_failed(argv, proc.returncode, errlog.read())

        try:
            result = feed(pipe) if feed else drain(pipe)  # type: ignore[misc]
            pipe.close()
        except BrokenPipeError:
            if proc.wait() != 0:
                raise failed() from None
            raise
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.wait() != 0:
            raise failed()
        return result


def command_failed(argv: Sequence[str], returncode: int, stderr: bytes | None) -> PipelineError:
    tail = (stderr or b"").decode(errors="replace").strip().splitlines()[-STDERR_TAIL_LINES:]
    detail = "\n    ".join(tail) if tail else "(no output on stderr)"
    return PipelineError(f"'{Path(argv[0]).name}' failed with exit code {returncode}: "
                         f"{shlex.join(argv)}\n    {detail}")
