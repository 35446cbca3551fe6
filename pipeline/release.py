"""GitHub Release tasks (issue 5): release-<flavor>.

Placeholder until the release stage lands: yields no tasks.
"""
from __future__ import annotations

from typing import Iterator


def tasks(ctx) -> Iterator[dict]:
    yield from ()
