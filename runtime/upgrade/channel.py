"""The flavor's upgrade channel: /etc/cos/upgrade.yaml, written by the pipeline.

    repository: REGISTRY/NAME        # where the flavor's images are pushed
    tags: "red-*-amd64"              # a glob over the tags; the version inside picks the newest

The newest tag is the one with the highest semantic version in its name (a release beats
its own pre-releases 0.2.0-dev, -rc1, -alpha, -beta); tags with no version (…-latest-…) are skipped.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from ..system import CosError, System

CHANNEL = "/etc/cos/upgrade.yaml"
# a pre-release is one of these words right after the version (the pipeline's `-dev`)
VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:-((?:dev|rc|alpha|beta)[0-9.]*))?")


@dataclass(frozen=True)
class Channel:
    repository: str
    tags: str


def load(system: System) -> Channel | None:
    """The configured channel; None when the image has none."""
    import yaml  # late: PyYAML only where a channel is read

    path = system.path(CHANNEL)
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CosError(f"{CHANNEL} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("repository"), str) or not data["repository"]:
        raise CosError(f"{CHANNEL} needs `repository: REGISTRY/NAME` (and `tags: PATTERN`)")
    tags = data.get("tags", "*")
    if not isinstance(tags, str):
        raise CosError(f"{CHANNEL}: tags must be a glob pattern such as \"red-*-amd64\", got {tags!r}")
    return Channel(data["repository"], tags)


def version_key(tag: str) -> tuple[int, int, int, int, str] | None:
    m = VERSION.search(tag)
    if not m:
        return None
    pre = m.group(4)
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, pre or ""


def newest_first(tags: list[str], pattern: str) -> list[str]:
    """Tags matching `pattern` that carry a version, newest first."""
    keyed = [(k, t) for t in tags if fnmatch.fnmatchcase(t, pattern) and (k := version_key(t)) is not None]
    return [t for _, t in sorted(keyed, reverse=True)]
