"""A recording, fault-injecting HTTP proxy in front of a local server.

It records every request (method, path, headers, body) so tests can check what the
SDK actually sent (moto drops most RegisterImage parameters), answers matching requests
with injected errors a given number of times (throttling, 5xx), can delay requests, and
lets a handler answer some requests itself (ImportSnapshot, which moto lacks).
"""
from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "content-length"}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        """EC2/STS query parameters (POST form body)."""
        if "x-www-form-urlencoded" not in self.headers.get("content-type", ""):
            return {}
        return {k: v[0] for k, v in parse_qs(self.body.decode(), keep_blank_values=True).items()}

    @property
    def action(self) -> str:
        return self.form.get("Action", "")


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    match: Callable[[Request], bool]
    times: int
    reply: Reply
    hits: int = 0


EC2_THROTTLE = Reply(503, b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
                          b'<Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>'
                          b'</Error></Errors><RequestID>fault</RequestID></Response>', {"Content-Type": "text/xml"})
JSON_THROTTLE = Reply(429, b'{"message": "Rate exceeded"}',
                      {"Content-Type": "application/json", "x-amzn-ErrorType": "ThrottlingException"})
SERVER_ERROR = Reply(500, b"internal error (injected)", {"Content-Type": "text/plain"})
UNAVAILABLE = Reply(503, b"service unavailable (injected)", {"Content-Type": "text/plain"})


class FaultProxy:
    def __init__(self, upstream_port: int, port: int = 0):
        self.upstream_port = upstream_port
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.handlers: list[Callable[[Request], Reply | None]] = []
        self.delay: tuple[Callable[[Request], bool], float] | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                              self._body())
                reply = proxy.handle(req)
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.body)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def inject(self, match: Callable[[Request], bool], times: int, reply: Reply) -> Fault:
        fault = Fault(match, times, reply)
        with self._lock:
            self.faults.append(fault)
        return fault

    def handle(self, req: Request) -> Reply:
        with self._lock:
            self.requests.append(req)
            for fault in self.faults:
                if fault.hits < fault.times and fault.match(req):
                    fault.hits += 1
                    return fault.reply
        if self.delay and self.delay[0](req):
            time.sleep(self.delay[1])
        for handler in self.handlers:
            reply = handler(req)
            if reply is not None:
                return reply
        return self.forward(req)

    def forward(self, req: Request) -> Reply:
        conn = getattr(self._local, "conn", None)
        for attempt in (1, 2):
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
                self._local.conn = conn
            try:
                headers = {k: v for k, v in req.headers.items() if k not in HOP}
                headers["content-length"] = str(len(req.body))
                conn.request(req.method, req.path, body=req.body, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                out = {k: v for k, v in resp.getheaders() if k.lower() not in HOP}
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    self._local.conn = conn = None
                return Reply(resp.status, body, out)
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                self._local.conn = conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def seen(self, pred: Callable[[Request], bool]) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if pred(r)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def path_of(req: Request) -> str:
    return urlsplit(req.path).path
