"""The OS image is pushed when a registry is configured: against a real registry v2
server (Debian's docker-registry) on 127.0.0.1, the pushed manifest's digest is the one
recorded in the manifest, the image can be pulled by digest, and a re-run pushes nothing."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from .conftest import executed_tasks, run_doit

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def registry(tmp_path):
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("docker-registry not installed: apt-get install docker-registry (./dev setup does)")
    port = _free_port()
    config = tmp_path / "config.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path}/data\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/v2/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_push_to_local_registry(red_build, red_paths, registry, docker_client):
    env = {"COS_REGISTRY": registry}
    out = run_doit("build-red", env=env)
    assert "build-red:push" in executed_tasks(out.stdout)
    pushed = json.loads(red_paths.state("push").read_text())
    repo, _, tag = pushed["reference"].rpartition(":")
    path = repo.split("/", 1)[1]
    catalog = json.load(urllib.request.urlopen(f"http://{registry}/v2/_catalog"))
    assert path in catalog["repositories"]
    req = urllib.request.Request(f"http://{registry}/v2/{path}/manifests/{tag}", method="HEAD",
                                 headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    served = urllib.request.urlopen(req).headers["Docker-Content-Digest"]
    assert served == pushed["digest"]
    manifest = json.loads(red_paths.manifest.read_text())
    assert manifest["image"]["digest"] == served
    pulled = docker_client.images.pull(f"{repo}@{served}")
    assert pulled.id == json.loads(red_paths.state("image").read_text())["id"]
    assert executed_tasks(run_doit("build-red", env=env).stdout) == []
