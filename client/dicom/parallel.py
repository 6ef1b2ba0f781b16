"""Run a function over chunks of work on all cores, with a progress bar.

Small jobs (fewer items than ``min_parallel``) or ``workers=1`` run in this process: starting
worker processes costs more than it saves there. Workers are forked where the platform can
(starting a fresh interpreter that imports torch costs seconds per worker) and, like torch's own
DataLoader workers, run with one compute thread each (``torch.set_num_threads(1)``), which
keeps torch's OpenMP pool out of the forked child.

A worker that dies (a native decoder crashing on a hostile file) breaks the pool; with
``isolate`` given, the unfinished chunks are then run item by item, each in a fresh worker, and
an item that kills its worker again gets ``isolate(item)`` (its "crashed" result) instead of
stopping the run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from .progress import progress_bar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def default_workers(workers: int | None) -> int:
    if workers is not None:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def torch_single_thread() -> None:
    """Worker initializer for work that runs torch: one compute thread per process."""
    import torch

    torch.set_num_threads(1)


def map_chunks(
    fn: Callable[[Sequence[T]], list[R]],
    items: Sequence[T],
    *,
    workers: int | None,
    description: str,
    progress: bool,
    chunk_size: int = 32,
    min_parallel: int = 64,
    uses_torch: bool = False,
    isolate: Callable[[T], R] | None = None,
) -> Iterator[list[R]]:
    """Yield ``fn(chunk)`` for consecutive chunks of ``items`` (in completion order).

    ``uses_torch``: import torch here before forking (so workers inherit it instead of each
    importing it) and give each worker one torch thread.
    """
    n_workers = default_workers(workers)
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    with progress_bar(description, len(items), enabled=progress) as advance:
        if n_workers <= 1 or len(items) < min_parallel:
            for chunk in chunks:
                out = fn(chunk)
                advance(len(chunk))
                yield out
            return
        done: set[int] = set()
        initializer = None
        if uses_torch:
            import torch  # noqa: F401 - imported once here, inherited by forked workers

            initializer = torch_single_thread
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        try:
            with ProcessPoolExecutor(
                max_workers=min(n_workers, len(chunks)), mp_context=ctx, initializer=initializer
            ) as pool:
                futures = {pool.submit(fn, chunk): k for k, chunk in enumerate(chunks)}
                for fut in as_completed(futures):
                    out = fut.result()
                    done.add(futures[fut])
                    advance(len(chunks[futures[fut]]))
                    yield out
        except BrokenProcessPool:
            rest = [chunk for k, chunk in enumerate(chunks) if k not in done]
            if isolate is not None and ctx.get_start_method() == "fork":
                log.warning("a worker process died; finishing %d chunk(s) one file per worker", len(rest))
                for chunk in rest:
                    out = [_one_isolated(fn, item, isolate, ctx, initializer) for item in chunk]
                    advance(len(chunk))
                    yield out
                return
            # e.g. a __main__ that worker processes cannot import (stdin, some notebooks)
            log.warning("worker processes failed to start; continuing in this process")
            for chunk in rest:
                out = fn(chunk)
                advance(len(chunk))
                yield out


def _one_isolated(
    fn: Callable[[Sequence[T]], list[R]],
    item: T,
    isolate: Callable[[T], R],
    ctx: multiprocessing.context.BaseContext,
    initializer: Callable[[], None] | None,
) -> R:
    """``fn([item])[0]`` in a fresh worker process; ``isolate(item)`` if that worker dies."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=initializer) as pool:
            return pool.submit(fn, [item]).result()[0]
    except BrokenProcessPool:
        log.warning("a file crashed its worker process; it is skipped")
        return isolate(item)
