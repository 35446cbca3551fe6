"""Reading disk files for upload: where the data is (SEEK_DATA/SEEK_HOLE), fixed-size
blocks that hold data, and whether a block is all zeros."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from core.sparse import data_extents as extents


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) byte ranges that hold data, up to `size`; holes are skipped. A
    filesystem that does not report holes gives one extent."""
    for start, length in extents(fd, size):
        yield start, min(start + length, size)


def blocks_with_data(fd: int, size: int, block: int) -> Iterator[int]:
    """Indexes of `block`-sized blocks that overlap any data extent, ascending, once each."""
    last = -1
    for start, end in data_extents(fd, size):
        for index in range(max(start // block, last + 1), (end - 1) // block + 1):
            yield index
            last = index


def read_block(fd: int, index: int, block: int, size: int) -> bytes:
    """Block `index`, zero-padded to `block` bytes at the end of the file."""
    data = os.pread(fd, block, index * block)
    return data if len(data) == block else data + bytes(block - len(data))


def allocated_bytes(path: str | os.PathLike) -> int:
    return os.stat(path).st_blocks * 512


ZERO_CACHE: dict[int, bytes] = {}


def is_zero(data: bytes) -> bool:
    zeros = ZERO_CACHE.get(len(data))
    if zeros is None:
        zeros = ZERO_CACHE.setdefault(len(data), bytes(len(data)))
    return data == zeros


def for_each_block(indexes: Iterable[int], work: Callable[[int], None], workers: int,
                   name: str) -> None:
    """work(index) on `workers` threads with at most 2 x workers blocks in flight (bounds
    memory); after the first failure no more work is started, and that failure is raised."""
    errors: list[BaseException] = []
    slots = threading.BoundedSemaphore(workers * 2)

    def run(index: int) -> None:
        try:
            if not errors:
                work(index)
        except BaseException as exc:
            errors.append(exc)
        finally:
            slots.release()

    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        for index in indexes:
            slots.acquire()
            if errors:
                slots.release()
                break
            pool.submit(run, index)
    if errors:
        raise errors[0]
