"""The cloud-config `layout` step: add partitions (and grow the last) on first boot.

Contract used by the stage runner (runtime.cloudconfig): apply(spec, system) where
`spec` is the step's `layout:` mapping as parsed from YAML; it raises CosError with
one line when it cannot do what was asked, and does nothing when the layout is already
in place (idempotent: it never touches an existing partition).
"""
from __future__ import annotations

from typing import Any

from ..system import CosError, System


def apply(spec: dict[str, Any], system: System) -> None:
    raise CosError("layout is not implemented yet")
