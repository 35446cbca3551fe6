"""Azurite (npm `azurite`, pinned in package.json) as a blob server on a free port."""
from __future__ import annotations

from pathlib import Path

from .util import REPO, free_port, need_tool, start, stop

# Azurite's published development account (not a secret).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Azurite:
    def __init__(self, workdir: Path):
        exe = need_tool(REPO / "node_modules/.bin/azurite-blob", "azurite-blob", "run `npm ci` in the repo (package.json)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        data = workdir / "azurite"
        data.mkdir(parents=True, exist_ok=True)
        self.proc = start([exe, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", str(data),
                           "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
                          self.port, "azurite", workdir / "azurite.log", timeout=60)

    def connection_string(self, blob_endpoint: str | None = None) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
                f"BlobEndpoint={blob_endpoint or self.url};")

    def close(self) -> None:
        stop(self.proc)
