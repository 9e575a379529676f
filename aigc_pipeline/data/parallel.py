"""Ordered, bounded, chunked parallel map over a stream (the decoding fan-out of ingest).

``Executor.map`` and ``Pool.imap`` both consume their whole input up front, which would hold
every archive member's bytes in memory at once; :func:`ordered_map` keeps at most
``2 * workers`` chunks in flight, and with a ``budget`` at most that many bytes of items (by
their ``weight``) plus the one being read, and yields results in input order, so the output is
the same whatever the number of workers.
"""

from __future__ import annotations

import collections
import enum
import itertools
import multiprocessing
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

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
    weight: Callable[[T], int] | None = None,
    budget: int | None = None,
) -> Generator[R, None, None]:
    """Yield ``fn(chunk)`` results item by item, in input order.

    ``fn`` takes a list of items and returns one result per item; it must be a picklable
    module-level function (or a ``functools.partial`` of one). With ``workers <= 1``, or when the
    whole input is at most ``min_parallel`` items, everything runs in this process (starting
    worker processes costs more than decoding a handful of files). Closing the generator early
    cancels the queued work.

    ``weight`` and ``budget`` bound memory: the next item is only pulled from ``items`` (for an
    archive: only read) once the items pulled but not yet returned by ``fn`` weigh less than
    ``budget``; so at most ``budget`` plus one item's weight is held at a time, whatever the
    chunk size and the number of workers. A chunk closes at ``chunk`` items or at
    ``budget / (2 * workers)`` of weight, whichever comes first, so large items still spread over
    the workers.

    Workers are forked from a "forkserver" process that imports the ``preload`` modules once
    (``fn``'s module, typically) and serves every later pool of this process: a plain fork is
    unsafe in a threaded caller (the Prefect flow runs stages in-process), and "spawn" would start
    and import everything again in each worker, a fixed cost of about half a CPU-second per worker
    (where there is no forkserver, e.g. Windows, "spawn" is used).
    """
    if budget is not None and budget < 1:
        raise ValueError(f"budget must be a positive number of bytes, got {budget}")
    measure = weight if weight is not None and budget is not None else (lambda item: 0)
    limit = budget if weight is not None and budget is not None else None
    it = iter(items)
    head: collections.deque[T] = collections.deque()
    head_weight = 0
    for item in it:
        head.append(item)
        head_weight += measure(item)
        if len(head) > max(min_parallel, 0) or (limit is not None and head_weight >= limit):
            break
    small = len(head) <= min_parallel and (limit is None or head_weight < limit)
    source = itertools.chain(_drain(head), it)  # the head's items are released as they are used
    if workers <= 1 or small:
        for group, _ in _batches(source, chunk, measure, limit):
            yield from fn(group)
        return

    pending: collections.deque[tuple[Future, T, int]] = collections.deque()
    in_flight = 0
    cap = None if limit is None else max(1, limit // (2 * workers))
    batch: list[T] = []
    batch_weight = 0
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context(preload))
    try:
        while True:
            # Room for one more item: results are taken in order until the budget allows it.
            while pending and (
                len(pending) >= 2 * workers or (limit is not None and in_flight + batch_weight >= limit)
            ):
                future, first, w = pending.popleft()
                in_flight -= w
                yield from _result(future, first, describe)
            nxt = next(source, _End.END)
            if nxt is _End.END:
                break
            batch.append(nxt)
            batch_weight += measure(nxt)
            if len(batch) >= chunk or (cap is not None and batch_weight >= cap):
                pending.append((pool.submit(fn, batch), batch[0], batch_weight))
                in_flight += batch_weight
                batch, batch_weight = [], 0
        if batch:
            pending.append((pool.submit(fn, batch), batch[0], batch_weight))
            batch = []
        while pending:
            future, first, _ = pending.popleft()
            yield from _result(future, first, describe)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _End(enum.Enum):
    """The end-of-source sentinel (an enum member, so type checkers narrow ``is`` tests on it)."""

    END = enum.auto()


def _drain(queue: collections.deque[T]) -> Iterator[T]:
    while queue:
        yield queue.popleft()


def _batches(
    it: Iterator[T], size: int, measure: Callable[[T], int], limit: int | None
) -> Iterator[tuple[list[T], int]]:
    """Lists of at most ``size`` items, closed early once they weigh ``limit`` (serial processing)."""
    batch: list[T] = []
    total = 0
    for item in it:
        batch.append(item)
        total += measure(item)
        if len(batch) >= size or (limit is not None and total >= limit):
            yield batch, total
            batch, total = [], 0
    if batch:
        yield batch, total


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
