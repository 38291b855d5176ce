"""Run one pure per-clip function over many clips, on all cores, with a progress bar.

Stages describe per-clip work as a top-level function of (clip record, settings)
(bound with ``functools.partial``), so the same function can run in-process, in a
local process pool (here) or later on a distributed engine. Results come back in
input order: all at once (``map_clips``) or one by one as they are ready (``iter_clips``, for
results too large to hold together, such as audio). A failure names the clip it happened on.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import ctypes
import functools
import itertools
import logging
import math
import multiprocessing
import os
import sys
import traceback
from typing import Any, Callable, Iterator, Sequence, TypeVar

from threadpoolctl import threadpool_limits
from tqdm import tqdm

from audiocnn.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# clips per pool task (at most; and at least 8 tasks per worker, for balance). Each task costs the
# stage's process a future, a wake-up and a result message: map_clips at 30,000 FSDD-sized clips ran
# 0.3-0.4 s faster with two workers at 256 than at 32. iter_clips holds AHEAD_PER_WORKER tasks'
# results per worker (possibly audio, or audio spilled to disk), so its tasks stay small unless asked.
MAP_CHUNK = 256
STREAM_CHUNK = 32
AHEAD_PER_WORKER = 4  # iter_clips: tasks submitted ahead of the consumer per worker (bounds the results in memory)
# glibc malloc for per-clip loops, which allocate and free the same few MB for every clip (STFT
# frames, spectra). Left to its dynamic tuning, glibc may hand the freed heap top back to the
# kernel after each clip, and the next clip faults every page in again: measured at 30,000
# demo-sized clips, 27-30 s of system time in the spectrogram stage against 4 s with these.
HEAP_MMAP_THRESHOLD = 8 << 20  # bytes: smaller blocks come from the heap (reused), larger ones are mapped
HEAP_TRIM_THRESHOLD = 64 << 20  # bytes of free heap top kept for the next clip instead of returned
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


class ClipError(DataError):
    """Processing one clip failed; the message names the clip, ``detail`` holds the traceback."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:  # keep ``detail`` across the process boundary
        return (ClipError, (str(self), self.detail))


def resolve_workers(workers: int) -> int:
    """``workers`` processes; 0 means one per CPU core this process may run on."""
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0")
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def keep_heap() -> None:
    """Fix glibc's malloc thresholds (``HEAP_*``) in this process, and so in the workers it forks; elsewhere a no-op."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS): its allocator, its defaults
        return
    mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)


@functools.cache
def one_blas_thread() -> None:
    """Limit this process's BLAS to one thread, for good (and so the workers it forks).

    Per-clip stages spread clips over processes; their matrix products are small (a clip's
    spectra times the mel filterbank), and a second BLAS thread in the stage's own process gains
    nothing there: after each product it spins on a core a worker needs. The stage scripts go
    further and start no BLAS thread pool at all (``audiocnn.single_blas``, set before numpy
    loads); this limit covers callers of the library, whose numpy is already loaded.
    """
    threadpool_limits(1, user_api="blas")


def in_pool(workers: int, count: int) -> bool:
    """Whether ``map_clips``/``iter_clips`` run ``count`` items in a process pool (else in this process)."""
    return resolve_workers(workers) > 1 and count > 1


def map_clips(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    desc: str,
    name: Callable[[T], str] = lambda item: str(item["path"]),  # type: ignore[index]
    meanwhile: Callable[[], object] | None = None,
) -> list[R]:
    """``[fn(item) for item in items]`` over ``workers`` processes (0 = all cores, 1 = in-process).

    ``fn`` must be picklable (a top-level function or a ``functools.partial`` of one);
    ``name(item)`` labels an item in error messages (default: its ``path``). The first
    failure stops the run and raises ClipError naming that item. ``meanwhile()``, when
    given, runs in this process while the workers compute (e.g. a figure), instead of after.
    """
    workers = resolve_workers(workers)
    keep_heap()
    one_blas_thread()
    try:
        if not in_pool(workers, len(items)):
            if meanwhile is not None:
                meanwhile()
            return list(_iter_here(fn, items, name, desc))
        return _run_pool(fn, items, name, desc, workers, meanwhile)
    except ClipError as err:
        log.debug("%s\n%s", err, err.detail)
        raise


def iter_clips(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    desc: str,
    name: Callable[[T], str] = lambda item: str(item["path"]),  # type: ignore[index]
    chunk: int = STREAM_CHUNK,
) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in input order, over ``workers`` processes (as ``map_clips``).

    At most ``AHEAD_PER_WORKER`` tasks of at most ``chunk`` items per worker are computed ahead
    of the consumer, so the results held at any time do not grow with the number of items
    (``MAP_CHUNK`` suits small results). Stopping the iteration early cancels the tasks not yet started.
    """
    workers = resolve_workers(workers)
    keep_heap()
    one_blas_thread()
    try:
        if not in_pool(workers, len(items)):
            yield from _iter_here(fn, items, name, desc)
        else:
            yield from _stream_pool(fn, items, name, desc, workers, chunk)
    except ClipError as err:
        log.debug("%s\n%s", err, err.detail)
        raise


def _stream_pool(fn: Callable[[T], R], items: Sequence[T], name: Callable[[T], str], desc: str,
                 workers: int, chunk: int) -> Iterator[R]:
    size = _chunk_size(len(items), workers, chunk)
    starts = iter(range(0, len(items), size))
    pending: collections.deque[cf.Future] = collections.deque()
    with _work_list(fn, items, name) as submit, _new_pool(workers) as pool:

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append(submit(pool, start, start + size))

        for _ in range(workers * AHEAD_PER_WORKER):  # the workers fork before the progress bar starts its thread
            submit_next()
        try:
            with _progress(len(items), desc) as bar:
                while pending:
                    chunk = pending.popleft().result()
                    submit_next()
                    for result in chunk:
                        yield result
                    bar.update(len(chunk))
        except BaseException:  # includes GeneratorExit: the consumer stopped early
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="clip", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def _iter_here(fn: Callable[[T], R], items: Sequence[T], name: Callable[[T], str], desc: str) -> Iterator[R]:
    with _progress(len(items), desc) as bar, threadpool_limits(1):  # 1 BLAS thread, as in the pool: same sums
        for item in items:
            yield _call(fn, item, name)
            bar.update(1)


def _chunk_size(count: int, workers: int, most: int) -> int:
    """Clips per pool task: about 8 tasks per worker, at most ``most``."""
    return max(1, min(most, math.ceil(count / (workers * 8))))


def _start_method() -> str:
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _new_pool(workers: int) -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(_start_method()),
                                  initializer=_init_worker)


_FORKED_WORK: dict[int, tuple[Callable, Sequence, Callable]] = {}  # (fn, items, name) by key, for forked workers
_WORK_KEYS = itertools.count()


@contextlib.contextmanager
def _work_list(fn: Callable[[T], R], items: Sequence[T],
               name: Callable[[T], str]) -> Iterator[Callable[[cf.ProcessPoolExecutor, int, int], cf.Future]]:
    """``submit(pool, start, stop)``: a task computing ``items[start:stop]``, for pools made inside this block.

    Forked workers inherit the function, the items and ``name`` (registered here before the pool
    forks), so a task is three numbers: nothing per item is pickled to the workers and unpickled
    there (30,000 spectrogram records: 0.13 s each way, 10 MB through the pipes), and an item is
    named only if it fails. Spawned workers (no fork on this platform) get the items pickled with
    each task, with their names (``name`` may be a lambda, which does not pickle).
    """
    if _start_method() != "fork":
        def submit_spawned(pool: cf.ProcessPoolExecutor, start: int, stop: int) -> cf.Future:
            chunk = items[start:stop]
            return pool.submit(_run_named_chunk, fn, chunk, [name(item) for item in chunk])

        yield submit_spawned
        return
    key = next(_WORK_KEYS)
    _FORKED_WORK[key] = (fn, items, name)
    try:
        yield lambda pool, start, stop: pool.submit(_run_forked_chunk, key, start, stop)
    finally:
        del _FORKED_WORK[key]


def _run_forked_chunk(key: int, start: int, stop: int) -> list[Any]:
    fn, items, name = _FORKED_WORK[key]  # inherited from the parent at fork
    return [_call(fn, item, name) for item in items[start:stop]]


def _run_pool(fn: Callable[[T], R], items: Sequence[T], name: Callable[[T], str], desc: str, workers: int,
              meanwhile: Callable[[], object] | None) -> list[R]:
    size = _chunk_size(len(items), workers, MAP_CHUNK)
    results: list[Any] = [None] * len(items)
    with _work_list(fn, items, name) as submit, _new_pool(workers) as pool:
        # every task is submitted (and the workers forked) before the progress bar starts its thread
        futures = {submit(pool, s, s + size): s for s in range(0, len(items), size)}
        try:
            if meanwhile is not None:
                meanwhile()
            with _progress(len(items), desc) as bar:
                for future in cf.as_completed(futures):
                    chunk = future.result()
                    results[futures[future] : futures[future] + len(chunk)] = chunk
                    bar.update(len(chunk))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _init_worker() -> None:
    """One BLAS thread per worker: the pool already uses every core, and results match workers=1."""
    threadpool_limits(1)


def _run_named_chunk(fn: Callable[[T], R], items: Sequence[T], names: Sequence[str]) -> list[R]:
    return [_call(fn, item, lambda _, item_name=item_name: item_name) for item, item_name in zip(items, names)]


def _call(fn: Callable[[T], R], item: T, name: Callable[[T], str]) -> R:
    try:
        return fn(item)
    except ClipError:
        raise
    except Exception as err:  # any failure becomes one error naming the clip
        raise ClipError(f"{name(item)}: {type(err).__name__}: {err}", traceback.format_exc()) from err
