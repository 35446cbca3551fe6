"""Make a Debian-family base image without a registry: mmdebstrap -> docker import.

The mirror is never written in the repo: it comes from the flavor's bootstrap.mirror,
$COS_DEBIAN_MIRROR, or the host's own apt sources, in that order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core import env

from . import docker_engine
from .config import Bootstrap
from .errors import PipelineError
from .files import atomic_path
from .run import run

log = logging.getLogger("cos.bootstrap")

APT_DIR = Path("/etc/apt")


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]


def host_sources(apt_dir: Path = APT_DIR) -> list[AptSource]:
    """deb entries of the host's sources.list(.d), one-line and deb822 formats."""
    found: list[AptSource] = []
    one_line = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                words = [w for w in words[1:] if not w.startswith("[")]  # drop [options]
                found.append(AptSource(words[0], words[1], tuple(words[2:])))
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = _deb822(stanza)
            if "deb" not in fields.get("Types", "").split() or fields.get("Enabled", "yes") == "no":
                continue
            for uri in fields.get("URIs", "").split():
                for suite in fields.get("Suites", "").split():
                    found.append(AptSource(uri, suite, tuple(fields.get("Components", "main").split())))
    return found


def _deb822(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def mirror_lines(cfg: Bootstrap, apt_dir: Path = APT_DIR) -> list[str]:
    """apt source lines for mmdebstrap: the suite, and -updates / -security when the host has them."""
    comps = " ".join(cfg.components)
    explicit = cfg.mirror or env.get("COS_DEBIAN_MIRROR")
    if explicit:
        return [f"deb {explicit} {cfg.suite} {comps}"]
    sources = host_sources(apt_dir)
    lines = [f"deb {s.uri} {s.suite} {comps}" for s in sources
             if s.suite in (cfg.suite, f"{cfg.suite}-updates", f"{cfg.suite}-security")]
    if not any(f" {cfg.suite} " in line for line in lines):
        raise PipelineError(
            f"no Debian mirror for suite '{cfg.suite}' in the host's apt sources ({apt_dir})",
            "set base.bootstrap.mirror in the flavor file or $COS_DEBIAN_MIRROR to a mirror URL")
    return list(dict.fromkeys(lines))


def bootstrap_image(cfg: Bootstrap, tag: str, workdir: Path) -> str:
    """mmdebstrap a root filesystem tarball and import it as `tag`; returns the image id."""
    tarball = workdir / f"bootstrap-{cfg.suite}.tar"
    cmd = ["mmdebstrap", f"--variant={cfg.variant}", "--format=tar"]
    if cfg.include:
        cmd.append("--include=" + ",".join(cfg.include))
    with atomic_path(tarball) as tmp:
        run([*cmd, cfg.suite, tmp, *mirror_lines(cfg)])
        repo, _, version = tag.rpartition(":")
        log.info("docker import %s as %s", tarball.name, tag)
        docker_engine.api().import_image_from_file(str(tmp), repository=repo, tag=version)
    tarball.unlink(missing_ok=True)  # the image holds it now
    image_id = docker_engine.image_id(tag)
    if image_id is None:
        raise PipelineError(f"docker import of the bootstrapped {cfg.suite} root did not produce {tag}")
    return image_id
