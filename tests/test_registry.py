"""The OS image is pushed when a registry is configured: against a real registry v2
server (Debian's docker-registry) on 127.0.0.1, the pushed manifest's digest is the one
recorded in the manifest, the image can be pulled by digest, the moving <flavor>-latest-<arch>
tag is the same manifest, the commit is in the manifest and the image's labels, and a re-run
pushes nothing. A registry with credentials (htpasswd) and a namespace, as the release
workflow uses the repository's registry: refused without them with a hint, pushed with them."""
from __future__ import annotations

import base64
import json
import urllib.request

import pytest

from tests.servers.registry import start_registry, stop

from .conftest import executed_tasks, run_doit

pytestmark = pytest.mark.slow


@pytest.fixture
def registry(tmp_path):
    reg = start_registry(tmp_path / "registry")
    yield reg.address
    stop(reg.proc)


@pytest.fixture
def auth_registry(tmp_path):
    reg = start_registry(tmp_path / "auth-registry", auth=True)
    yield reg
    stop(reg.proc)


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
    # the moving tag a user's FROM names is the same manifest
    latest = "red-latest-x86_64"
    assert pushed["latest"] == f"{repo}:{latest}"
    req = urllib.request.Request(f"http://{registry}/v2/{path}/manifests/{latest}", method="HEAD",
                                 headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert urllib.request.urlopen(req).headers["Docker-Content-Digest"] == served
    # the commit is in the manifest and the image's labels (not in its files)
    commit = manifest["image"]["commit"]
    assert len(commit) == 40 and pulled.labels["org.opencontainers.image.revision"] == commit
    assert manifest["image"]["pushed"] == f"{repo}@{served}"
    assert executed_tasks(run_doit("build-red", env=env).stdout) == []


def test_push_with_credentials_and_a_namespace(red_build, red_paths, auth_registry):
    # what the release workflow does with the repository's registry: host/owner + a token
    target = f"{auth_registry.address}/my-org"
    denied = run_doit("build-red", env={"COS_REGISTRY": target}, check=False)
    assert denied.returncode != 0
    assert "set COS_REGISTRY_USERNAME and COS_REGISTRY_PASSWORD" in denied.stdout + denied.stderr
    assert auth_registry.password not in denied.stdout + denied.stderr
    env = {"COS_REGISTRY": target, "COS_REGISTRY_USERNAME": auth_registry.user,
           "COS_REGISTRY_PASSWORD": auth_registry.password}
    assert "build-red:push" in executed_tasks(run_doit("build-red", env=env).stdout)
    pushed = json.loads(red_paths.state("push").read_text())
    assert pushed["reference"].startswith(f"{target}/")
    repo, _, tag = pushed["reference"].rpartition(":")
    path = repo.split("/", 1)[1]
    req = urllib.request.Request(f"http://{auth_registry.address}/v2/{path}/manifests/{tag}", method="HEAD",
                                 headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json",
                                          "Authorization": "Basic " + base64.b64encode(
                                              f"{auth_registry.user}:{auth_registry.password}".encode()).decode()})
    assert urllib.request.urlopen(req).headers["Docker-Content-Digest"] == pushed["digest"]
