"""The version a build carries: $COS_VERSION, else the git tag vX.Y.Z at HEAD,
else the flavor's version with -g<sha8> (a build between tags)."""
from __future__ import annotations

import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

TAG_RE = re.compile(r"^v(\d+\.\d+\.\d+(?:[-+.][0-9A-Za-z.+-]+)?)$")


@lru_cache(maxsize=None)
def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def resolve(config_version: str, root: Path) -> str:
    if env := os.environ.get("COS_VERSION"):
        return env
    tags = _git(root, "tag", "--points-at", "HEAD") or ""
    for tag in sorted(tags.split()):
        if m := TAG_RE.match(tag):
            return m.group(1)
    sha = _git(root, "rev-parse", "--short=8", "HEAD")
    return f"{config_version}-g{sha}" if sha else config_version
