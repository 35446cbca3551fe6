"""`commands`: each one `sh -c`; the first that fails ends the step (like `set -e`: later
commands of a step usually depend on earlier ones), later steps still run."""
from __future__ import annotations

from typing import Any

from ...system import CosError
from ..context import Context
from ..spec import str_list


def parse(value: Any, where: str) -> list[str]:
    return str_list(value, where)


def apply(spec: list[str], ctx: Context) -> None:
    for command in spec:
        code = ctx.system.run_logged(["sh", "-c", command], env=ctx.shell_env(), cwd=ctx.cwd)
        if code != 0:
            raise CosError(f"command exited {code}: {command}")
