"""Ordered, bounded, chunked parallel map over a stream (the decoding fan-out of ingest).

``Executor.map`` and ``Pool.imap`` both consume their whole input up front, which would hold
every archive member's bytes in memory at once; :func:`ordered_map` keeps at most
``2 * workers`` chunks in flight and yields results in input order, so the output is the same
whatever the number of workers.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

from aigc_pipeline.errors import DataError

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """The CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def ordered_map(
    fn: Callable[[list[T]], list[R]],
    items: Iterable[T],
    *,
    workers: int,
    chunk: int = 8,
    min_parallel: int = 64,
    describe: Callable[[T], str] = repr,
    preload: tuple[str, ...] = (),
) -> Iterator[R]:
    """Yield ``fn(chunk)`` results item by item, in input order.

    ``fn`` takes a list of items and returns one result per item; it must be a picklable
    module-level function (or a ``functools.partial`` of one). With ``workers <= 1``, or when the
    whole input is at most ``min_parallel`` items, everything runs in this process (starting
    worker processes costs more than decoding a handful of files). Closing the generator early
    cancels the queued work.

    Workers are forked from a "forkserver" process that imports the ``preload`` modules once
    (``fn``'s module, typically) and serves every later pool of this process: a plain fork is
    unsafe in a threaded caller (the Prefect flow runs stages in-process), and "spawn" would start
    and import everything again in each worker, a fixed cost of about half a CPU-second per worker
    (where there is no forkserver, e.g. Windows, "spawn" is used).
    """
    it = iter(items)
    head = list(itertools.islice(it, max(min_parallel, 0) + 1))
    if workers <= 1 or len(head) <= min_parallel:
        for start in range(0, len(head), chunk):
            yield from fn(head[start : start + chunk])
        for batch in _chunks(it, chunk):
            yield from fn(batch)
        return

    pending: collections.deque[tuple[Future, T]] = collections.deque()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context(preload))
    try:
        for batch in _chunks(itertools.chain(head, it), chunk):
            pending.append((pool.submit(fn, batch), batch[0]))
            while len(pending) >= 2 * workers:
                yield from _result(*pending.popleft(), describe)
        while pending:
            yield from _result(*pending.popleft(), describe)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _context(preload: tuple[str, ...]) -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    if preload:
        # Only read when the server starts (once per process); later calls change nothing.
        ctx.set_forkserver_preload(list(preload))
    return ctx


def _result(future: Future, first: T, describe: Callable[[T], str]) -> list:
    try:
        return future.result()
    except BrokenProcessPool:
        # A worker died (killed for memory, or a decoder crashed the interpreter): name where.
        raise DataError(
            f"a decoding worker process died in the chunk starting at {describe(first)} "
            "(out of memory, or a crashing image decoder); rerun with --workers 1 to find the file"
        ) from None


def _chunks(it: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(it)
    while batch := list(itertools.islice(it, size)):
        yield batch
