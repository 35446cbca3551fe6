"""Reach a Docker engine (or start one), and talk to it through the docker SDK."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from core import env

from .errors import PipelineError
from .run import require_tool

log = logging.getLogger("cos.docker")

DOCKERD_ARGS = ["--storage-driver=overlay2", "--bridge=none", "--iptables=false"]
START_TIMEOUT = 60


def _ping(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # the SDK raises several types for "no daemon"
        return False


@cache
def client():
    """A docker client for a daemon that answers; start dockerd if none does."""
    import docker

    try:
        c = docker.from_env(timeout=600)
        if _ping(c):
            return c
    except docker.errors.DockerException:
        pass
    if host := env.raw("DOCKER_HOST"):
        raise PipelineError(f"no Docker engine answers at DOCKER_HOST={env.shorten(host)}",
                            "start that daemon, or unset DOCKER_HOST to use (or start) the local one")
    _start_dockerd()
    c = docker.from_env(timeout=600)
    if not _ping(c):
        raise PipelineError("dockerd was started but does not answer", "see build/dockerd.log")
    return c


def api() -> Any:
    """The low-level API client (streaming build logs, exports)."""
    return client().api


def _start_dockerd() -> None:
    dockerd = require_tool("dockerd")
    if os.geteuid() != 0:
        raise PipelineError("no Docker engine answers and dockerd can only be started as root",
                            "start Docker (e.g. systemctl start docker) or add yourself to the docker group")
    from .config import build_root
    logfile = build_root() / "dockerd.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log.info("no Docker engine answers; starting %s %s (log: %s)", dockerd, " ".join(DOCKERD_ARGS), logfile)
    with open(logfile, "ab") as out:
        subprocess.Popen([dockerd, *DOCKERD_ARGS], stdout=out, stderr=out,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    import docker
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if _ping(docker.from_env(timeout=5)):
                return
        except docker.errors.DockerException:
            pass
        time.sleep(0.5)
    raise PipelineError(f"dockerd did not answer within {START_TIMEOUT}s", f"see {logfile}")


def image_id(ref: str) -> str | None:
    import docker
    try:
        return client().images.get(ref).id
    except docker.errors.ImageNotFound:
        return None


def pull(ref: str) -> str:
    """Pull `ref`; return its image id. Raises PipelineError with the daemon's reason."""
    import docker
    log.info("pulling %s", ref)
    try:
        return client().images.pull(ref).id
    except docker.errors.APIError as exc:
        raise PipelineError(f"cannot pull {ref}: {exc.explanation or exc}") from None


def build(context: Path, tag: str, buildargs: dict[str, str], dockerfile: str = "Dockerfile",
          network_mode: str = "host", labels: dict[str, str] | None = None) -> str:
    """docker build with the log streamed line by line; returns the image id.
    A dockerfile outside `context` is sent inside the context by the SDK."""
    log.info("docker build %s -t %s", context, tag)
    stream = api().build(path=str(context), dockerfile=dockerfile, tag=tag, buildargs=buildargs,
                         network_mode=network_mode, labels=labels or {}, rm=True,
                         forcerm=True, decode=True, nocache=no_cache())
    return _follow_build(stream, tag)


def no_cache() -> bool:
    """$COS_DOCKER_NO_CACHE=1 builds OS images without docker's layer cache (cold builds)."""
    return env.flag("COS_DOCKER_NO_CACHE")


def build_from_tar(fileobj, tag: str, labels: dict[str, str] | None = None) -> str:
    """docker build of an in-memory context tar (with its own Dockerfile)."""
    stream = api().build(fileobj=fileobj, custom_context=True, tag=tag, labels=labels or {},
                         rm=True, forcerm=True, decode=True)
    return _follow_build(stream, tag)


def _follow_build(stream: Iterator[dict[str, Any]], tag: str) -> str:
    last: list[str] = []
    for chunk in stream:
        if "stream" in chunk:
            text = chunk["stream"].rstrip("\n")
            if text:
                print(text, flush=True)
                last = (last + [text])[-20:]
        elif "error" in chunk:
            raise PipelineError(f"docker build of {tag} failed: {chunk['error'].strip()}",
                                "the build log above shows the failing step")
    found = image_id(tag)
    if found is None:
        raise PipelineError(f"docker build of {tag} finished but the image is missing",
                            "\n".join(last))
    return found


def push(ref: str) -> str:
    """Push `ref`; return the registry digest (sha256:...)."""
    repo, _, tag = ref.rpartition(":")
    digest = None
    user, password = env.get("COS_REGISTRY_USERNAME"), env.get("COS_REGISTRY_PASSWORD")
    if bool(user) != bool(password):
        raise PipelineError("only one of COS_REGISTRY_USERNAME and COS_REGISTRY_PASSWORD is set",
                            "set both (the registry's user and its password or token), or neither")
    # passed per push, not stored by `docker login` in a config file on the runner
    auth = {"username": user, "password": password} if user else None
    for chunk in api().push(repo, tag=tag, stream=True, decode=True, auth_config=auth):
        if "error" in chunk:
            raise PipelineError(f"docker push {ref} failed: {chunk['error']}",
                                "check that the registry is reachable and accepts pushes"
                                + ("" if auth else "; if it needs credentials, set COS_REGISTRY_USERNAME "
                                   "and COS_REGISTRY_PASSWORD"))
        digest = chunk.get("aux", {}).get("Digest", digest)
    if not digest:
        raise PipelineError(f"docker push {ref} did not report a digest")
    return digest


EXPORT_LABEL = "org.cos-pipeline.export"


class ExportedRootfs:
    """Context manager: a stopped container of `image` and its filesystem as a tar stream."""

    def __init__(self, image: str):
        self.image = image
        self.container = None

    def __enter__(self):
        _remove_orphan_exports()
        # Images from `docker import` have no CMD; a command must be given.
        self.container = client().containers.create(
            self.image, command=["/bin/true"],
            labels={EXPORT_LABEL: f"{socket.gethostname()}:{os.getpid()}"})
        return self.container.export(chunk_size=1024 * 1024)

    def __exit__(self, *exc):
        import docker
        if self.container is not None:
            try:
                self.container.remove(force=True)
            except docker.errors.NotFound:
                pass


def _remove_orphan_exports() -> None:
    """A run killed mid-export (SIGKILL skips __exit__) leaves its container behind.
    Remove only those whose process on this host is gone: others may be exporting now."""
    import docker
    for c in client().containers.list(all=True, filters={"label": EXPORT_LABEL}):
        host, _, pid = c.labels.get(EXPORT_LABEL, "").partition(":")
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def docker_cli_available() -> bool:
    return shutil.which("docker") is not None
