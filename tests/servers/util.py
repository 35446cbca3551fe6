"""Process and port helpers shared by the server launchers."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

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


class JsonApiServer:
    """A small REST server on 127.0.0.1 for an API with no emulator (Azure ARM, GCP
    Compute): JSON (or form) in, JSON out; every request is recorded, faults can be
    injected; subclasses answer in handle() and say how a fault looks in fault_answer()."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.faults: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = _decode(self.rfile.read(length) if length else b"", self.headers.get("Content-Type", ""))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, payload, extra = server.dispatch(self.command, self.path, headers, body)
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_DELETE = do_POST = do_PATCH = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail(self, method: str, pattern: str, times: int, status: int = 503) -> dict:
        """Answer the next `times` matching requests with `status`."""
        fault = {"method": method, "re": re.compile(pattern), "times": times, "status": status, "hits": 0}
        self.faults.append(fault)
        return fault

    def dispatch(self, method: str, raw: str, headers: dict, body) -> tuple[int, object, dict]:
        path = urlsplit(raw).path.rstrip("/")
        with self.lock:
            self.requests.append((method, path, body))
            for f in self.faults:
                if f["hits"] < f["times"] and f["method"] == method and f["re"].search(path):
                    f["hits"] += 1
                    return self.fault_answer(f["status"])
        answer = self.handle(method, raw, headers, body)
        return answer if len(answer) == 3 else (*answer, {})

    def fault_answer(self, status: int) -> tuple[int, object, dict]:
        raise NotImplementedError

    def handle(self, method: str, raw: str, headers: dict, body) -> tuple:
        raise NotImplementedError


def _decode(raw: bytes, content_type: str):
    if not raw:
        return None
    if "form-urlencoded" in content_type:
        return {k: v[0] for k, v in parse_qs(raw.decode()).items()}
    return json.loads(raw)
