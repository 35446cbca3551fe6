"""Cloud publishing tasks (issue 4): publish-<flavor>[:aws|:azure|:gcp] and cloud-gc.

Placeholder until the cloud uploaders land: yields no tasks.
"""
from __future__ import annotations

from typing import Iterator


def tasks(ctx) -> Iterator[dict]:
    yield from ()


def gc_tasks(ctxs) -> Iterator[dict]:
    yield from ()
