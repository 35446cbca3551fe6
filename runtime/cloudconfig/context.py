"""What a step function works through: the System (root, dry-run, runner) plus the few
file operations steps need, each honouring dry-run in ONE place (log, write nothing)."""
from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..system import CosError, System, write_atomic

log = logging.getLogger("cos")


@dataclass
class Context:
    system: System
    stage: str

    @property
    def dry_run(self) -> bool:
        return self.system.dry_run

    def path(self, p: str | Path) -> Path:
        return self.system.path(p)

    def read_text(self, p: str) -> str:
        """A file of the target, "" when it does not exist."""
        try:
            return self.path(p).read_text()
        except FileNotFoundError:
            return ""

    def write(self, p: str, data: bytes, mode: int | None = None, owner: tuple[int, int] | None = None) -> None:
        """Atomic write of target path `p`. An existing file keeps its mode and owner unless
        given (so /etc/shadow stays root:shadow 0640)."""
        target = self.path(p)
        if self.dry_run:
            log.info("would write %s (%d bytes%s)", p, len(data), f", mode {mode:04o}" if mode is not None else "")
            return
        if owner is None and target.exists():
            st = target.stat()
            owner = (st.st_uid, st.st_gid)
        write_atomic(target, data, mode=mode, owner=owner)

    def mkdir(self, p: str, mode: int | None = None, owner: tuple[int, int] | None = None) -> None:
        target = self.path(p)
        if self.dry_run:
            log.info("would create directory %s", p)
            return
        target.mkdir(parents=True, exist_ok=True)
        if mode is not None:
            os.chmod(target, mode)
        if owner is not None:
            os.chown(target, *owner)

    def shell_env(self) -> dict[str, str]:
        return {"COS_ROOT": str(self.system.root), "COS_STAGE": self.stage}

    @property
    def cwd(self) -> Path | None:
        """Where commands run: as is on the running system; in the root on a scratch root
        (scripts use "$COS_ROOT/etc/..." to work in both)."""
        return None if self.system.is_host_root else self.system.root

    def shell(self, script: str, timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
        """`sh -c script` with its output captured (for `if` conditions)."""
        try:
            return self.system.run(["sh", "-c", script], check=False, env=self.shell_env(), cwd=self.cwd,
                                   timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CosError(f"'{script}' did not finish within {timeout:.0f}s") from None

