"""Process and port helpers shared by the server launchers."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def start(cmd: list[str], port: int, what: str, log: Path, timeout: float = 30, **kw) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)
    try:
        wait_port(port, proc, timeout, what)
    except RuntimeError as exc:
        stop(proc)
        raise RuntimeError(f"{exc}; log: {log.read_text()[-2000:]}") from None
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def need_tool(path: str | Path | None, name: str, install: str) -> str:
    """A tool the fixture needs: fail loudly in CI, skip with a reason locally."""
    found = str(path) if path and Path(path).exists() else shutil.which(name)
    if found:
        return found
    msg = f"{name} not found: {install}"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)
