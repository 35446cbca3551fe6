"""The version a build carries.

1. $COS_VERSION when set (CI passes the pushed tag; a leading 'v' is dropped);
2. else the highest tag vX.Y.Z[-pre] that points at HEAD;
3. else, between tags, the flavor's configured version with -dev: the commit is not part
   of the version (it goes into manifest.json), so a commit that changes nothing in the
   image changes nothing in its files (os-release holds the version) and rebuilds nothing;
4. else (not a git checkout) the configured version as is.

The version names artifacts and the release tag (v<version>), so it must be a
plain token: COS_VERSION with spaces or slashes is refused.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from core import env as environ

from .errors import ConfigError

TAG_RE = re.compile(r"^v(\d+)\.(\d+)\.(\d+)((?:[-+.~][0-9A-Za-z.+~-]+)?)$")
DEV_SUFFIX = "-dev"   # a build between release tags
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}$")  # at most 64: it is in file names


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _tag_key(match: re.Match[str]) -> tuple[int, int, int, bool, str]:
    major, minor, patch, rest = match.groups()
    # semver: a release sorts after its pre-releases (v1.0.0 > v1.0.0-rc1)
    return int(major), int(minor), int(patch), rest == "", rest


def tag_version(tags: list[str]) -> str | None:
    """The version of the highest release tag among `tags` (vX.Y.Z wins over its -rc)."""
    matches = [m for t in tags if (m := TAG_RE.match(t))]
    if not matches:
        return None
    best = max(matches, key=_tag_key)
    return best.group(0)[1:]


def from_env() -> str | None:
    env = (environ.get("COS_VERSION") or "").strip()
    if not env:
        return None
    version = env[1:] if TAG_RE.match(env) else env
    if not VERSION_RE.match(version):
        raise ConfigError(f"COS_VERSION={environ.shorten(env)} is not a usable version",
                          "use letters, digits and . + ~ _ - only (at most 64), e.g. 1.2.3 or v1.2.3")
    return version


def resolve(config_version: str, root: Path) -> str:
    if env := from_env():
        return env
    if tagged := tag_version((_git(root, "tag", "--points-at", "HEAD") or "").split()):
        return tagged
    return f"{config_version}{DEV_SUFFIX}" if _git(root, "rev-parse", "HEAD") else config_version


def head_commit(root: Path) -> str | None:
    return _git(root, "rev-parse", "HEAD")


def release_tag(version: str) -> str:
    return f"v{version}"


def is_tagged_release(version: str) -> bool:
    """True for X.Y.Z[-pre] from a tag; False for a between-tags -dev build."""
    return TAG_RE.match(f"v{version}") is not None and not version.endswith(DEV_SUFFIX)
