"""`layout`: handed as parsed to runtime.install.layout.apply (its own module validates it)."""
from __future__ import annotations

from typing import Any

from ..context import Context
from ..spec import mapping


def parse(value: Any, where: str) -> dict[str, Any]:
    return mapping(value, where)


def apply(spec: dict[str, Any], ctx: Context) -> None:
    from ...install import layout  # imported when used: the runner works without the install tools

    layout.apply(spec, ctx.system)
