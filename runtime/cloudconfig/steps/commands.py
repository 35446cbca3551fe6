"""`commands`: each one `sh -c`; the first that fails ends the step (like `set -e`: later
commands of a step usually depend on earlier ones), later steps still run."""
from __future__ import annotations

import logging
from typing import Any

from ...system import CosError
from ..context import Context, output_tail
from ..spec import str_list

log = logging.getLogger("cos")


def parse(value: Any, where: str) -> list[str]:
    return str_list(value, where)


def apply(spec: list[str], ctx: Context) -> None:
    for command in spec:
        proc = ctx.shell(command)
        for line in output_tail(proc):
            log.info("  | %s", line)
        if proc.returncode != 0:
            raise CosError(f"command exited {proc.returncode}: {command}")
