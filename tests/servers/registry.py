"""A real registry v2 server for tests: Debian's docker-registry (distribution's
registry binary) on 127.0.0.1:<free port>, plain HTTP, optionally with htpasswd auth
(bcrypt, made by apache2-utils' htpasswd). Images go in with skopeo."""
from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from .util import free_port, start, stop


@dataclass
class Registry:
    address: str                     # 127.0.0.1:PORT
    proc: subprocess.Popen
    user: str | None = None
    password: str | None = None
    log: Path | None = None          # its access log (the tests count blob GETs in it)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def registries_conf(self) -> str:
        """The containers-registries.conf(5) lines that let skopeo use it over plain HTTP."""
        return f'[[registry]]\nlocation = "{self.address}"\ninsecure = true\n'

    def auth_json(self) -> str:
        import base64
        import json
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return json.dumps({"auths": {self.address: {"auth": token}}})

    def push_dir(self, oci_layout: Path, name: str, tag: str) -> str:
        """Push an OCI layout (tag `cos`) as NAME:TAG; returns the registry's manifest digest."""
        creds = ["--dest-creds", f"{self.user}:{self.password}"] if self.user else []
        digest_file = oci_layout.parent / f".{name.replace('/', '_')}-{tag}.digest"
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false", *creds,
                        "--digestfile", str(digest_file), f"oci:{oci_layout}:cos",
                        f"docker://{self.address}/{name}:{tag}"], check=True, capture_output=True)
        return digest_file.read_text().strip()


def start_registry(workdir: Path, auth: bool = False) -> Registry:
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("docker-registry not installed: apt-get install docker-registry (scripts/install-deps does)")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {workdir}/data\n" \
             f"http:\n  addr: 127.0.0.1:{port}\n"
    user = password = None
    if auth:
        if shutil.which("htpasswd") is None:
            pytest.fail("htpasswd not installed: apt-get install apache2-utils (scripts/install-deps does)")
        user, password = "cos", "s3cret-test"
        subprocess.run(["htpasswd", "-Bbc", str(workdir / "htpasswd"), user, password], check=True,
                       capture_output=True)
        config += f"auth:\n  htpasswd:\n    realm: cos-test\n    path: {workdir}/htpasswd\n"
    (workdir / "config.yml").write_text(config)
    proc = start([binary, "serve", str(workdir / "config.yml")], port, "docker-registry", workdir / "registry.log")
    return Registry(f"127.0.0.1:{port}", proc, user, password, workdir / "registry.log")


def is_up(address: str) -> bool:
    try:
        urllib.request.urlopen(f"http://{address}/v2/", timeout=2)
        return True
    except urllib.error.HTTPError as e:
        return e.code == 401
    except OSError:
        return False


__all__ = ["Registry", "start_registry", "stop", "is_up"]
