"""run.stream(): the one helper for a child whose stdin or stdout we work on while it runs.
A failing reader stops an endless child at once; a child that dies first is reported with
its own stderr, not as a broken pipe; what the reader returns is returned."""
from __future__ import annotations

import time

import pytest

from pipeline.errors import PipelineError
from pipeline.run import stream


def test_drain_returns_what_it_read():
    assert stream(["printf", "abc"], drain=lambda out: out.read()) == b"abc"


def test_a_failing_drain_stops_the_child_instead_of_waiting_for_it():
    def fail_after_some(out):
        out.read(65536)
        raise OSError(28, "No space left on device")  # as writing our output to a full disk does

    started = time.monotonic()
    with pytest.raises(OSError, match="No space left"):
        stream(["yes"], drain=fail_after_some)  # `yes` never ends: waiting for it would hang
    assert time.monotonic() - started < 10


def test_a_child_that_dies_first_is_reported_with_its_stderr():
    with pytest.raises(PipelineError, match=r"'sh' failed with exit code 3(.|\n)*bad input"):
        stream(["sh", "-c", "echo bad input >&2; exit 3"], feed=lambda stdin: stdin.write(b"x" * (8 << 20)))


def test_exactly_one_of_feed_and_drain():
    with pytest.raises(TypeError):
        stream(["true"])
