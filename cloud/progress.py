"""Upload progress as log lines (bytes, bytes/s): readable in a terminal and in CI logs,
and thread-safe because uploads run in parallel workers."""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("cos.cloud")

MB = 1_000_000


class Progress:
    def __init__(self, label: str, total: int, every_s: float = 2.0):
        self.label = label
        self.total = total          # bytes we intend to send
        self.sent = 0
        self.requests = 0
        self.every_s = every_s
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last = self._start
        self._end: float | None = None
        log.info("%s: sending %.1f MB", label, total / MB)

    def add(self, nbytes: int, requests: int = 1) -> None:
        with self._lock:
            self.sent += nbytes
            self.requests += requests
            now = time.monotonic()
            if now - self._last < self.every_s:
                return
            self._last = now
        log.info("%s: %.1f / %.1f MB (%.1f MB/s)", self.label, self.sent / MB, self.total / MB, self.rate())

    def rate(self) -> float:
        elapsed = (self._end or time.monotonic()) - self._start
        return self.sent / MB / elapsed if elapsed > 0 else 0.0

    def done(self) -> None:
        self._end = time.monotonic()
        log.info("%s: sent %.1f MB in %d requests, %.1f s (%.1f MB/s)", self.label, self.sent / MB,
                 self.requests, self._end - self._start, self.rate())

    def stats(self) -> dict:
        return {"bytes_sent": self.sent, "requests": self.requests,
                "seconds": round((self._end or time.monotonic()) - self._start, 3),
                "mb_per_s": round(self.rate(), 1)}
