"""The agent cache's I/O threads: file work off the event loop, every task on them owned until it ends.

Two lanes, so a read that hangs (a failing disk, a stalled network mount) never holds up a delete,
an eviction or shutdown: reads (loading an entry, indexing the folder at start) and writes (entry
files, removals, touches, quarantine, the lock). A lane runs its jobs in the order they were
started, on one thread, and bounds each one: a job still running `timeout` seconds after it started
fails with TimeoutError (an OSError, ETIMEDOUT): for a read, a miss; for a write, a failed write.
Python cannot stop a thread, so the stuck one is left to finish its job alone (a daemon thread: it
never holds up the process's exit) and the lane goes on with a new one; while MAX_STUCK threads of
a lane are stuck, its new jobs fail at once rather than pile up on a dead disk.

An OSError says nothing about the file it hit (disk full, I/O error...): `error` counts it by errno
name in semcache_cache_disk_errors_total.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import queue
import threading
from typing import Any, Awaitable, Callable

from semcache.ops.metrics import Metrics

log = logging.getLogger("semcache.cache")

READ_TIMEOUT = 10.0  # seconds a read may take before it counts as a miss
WRITE_TIMEOUT = 60.0  # seconds a write, removal or move may take before it counts as failed
MAX_STUCK = 2  # hung threads per lane before its jobs fail at once
# errno names kept as metric labels (anything else is "other": the label set stays small)
_ERRNO_LABELS = frozenset({"ENOSPC", "EDQUOT", "EIO", "EROFS", "EACCES", "EPERM", "ENOENT", "EMFILE", "ENFILE",
                           "ETIMEDOUT"})


def errno_label(exc: BaseException) -> str:
    name = errno.errorcode.get(getattr(exc, "errno", None) or 0, "")
    return name if name in _ERRNO_LABELS else "other"


class _Job:
    __slots__ = ("fn", "args", "loop", "future", "timeout", "timer")

    def __init__(self, fn: Callable, args: tuple, loop: asyncio.AbstractEventLoop, future: asyncio.Future,
                 timeout: float):
        self.fn, self.args, self.loop, self.future, self.timeout = fn, args, loop, future, timeout
        self.timer: asyncio.TimerHandle | None = None


class _Worker(threading.Thread):
    def __init__(self, lane: Lane, name: str):
        super().__init__(name=name, daemon=True)
        self.lane = lane
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.retired = False  # abandoned in a job past its timeout: it ends with that job
        self.done = False

    def run(self) -> None:
        try:
            while not self.retired:
                job = self.jobs.get()
                if job is None:
                    return
                _call(job.loop, self.lane._started, self, job)
                try:
                    result, error = job.fn(*job.args), None
                except BaseException as exc:
                    result, error = None, exc
                _call(job.loop, self.lane._finished, job, result, error)
        finally:
            with self.lane._lock:
                self.done = True
                self.lane.stuck -= self.retired


def _call(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody waits for this any more
        pass


def _timed_out(message: str) -> TimeoutError:
    return TimeoutError(errno.ETIMEDOUT, message)


class Lane:
    """Jobs in order on one thread at a time, each bounded by `timeout` seconds from its start."""

    def __init__(self, name: str, timeout: float):
        self.name, self.timeout = name, timeout
        self.stuck = 0  # abandoned threads still inside their job
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._made = 0

    def submit(self, fn: Callable, *args: Any, timeout: float | None = None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self.stuck >= MAX_STUCK:
            future.set_exception(self._hung())
        else:
            self._current().jobs.put(_Job(fn, args, loop, future, timeout or self.timeout))
        return future

    def stop(self) -> None:
        """The thread ends once its queued jobs are done (nothing waits for it)."""
        if self._worker is not None:
            self._worker.jobs.put(None)
            self._worker = None

    def _hung(self) -> TimeoutError:
        return _timed_out(f"{self.stuck} cache file operations of {self.name} are hung")

    def _current(self) -> _Worker:
        if self._worker is None:
            self._made += 1
            self._worker = _Worker(self, f"{self.name}-{self._made}")
            self._worker.start()
        return self._worker

    # On the event loop, called from the thread ---------------------------------------------------

    def _started(self, worker: _Worker, job: _Job) -> None:
        job.timer = job.loop.call_later(job.timeout, self._expired, worker, job)

    def _finished(self, job: _Job, result: Any, error: BaseException | None) -> None:
        if job.timer is not None:
            job.timer.cancel()
        if job.future.done():  # timed out already, or its waiter was cancelled
            return
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)

    def _expired(self, worker: _Worker, job: _Job) -> None:
        """The job overran: it fails now; its thread is abandoned and its queue goes to a new one."""
        if job.future.done():
            return
        job.future.set_exception(_timed_out(f"{job.fn.__name__} did not finish within {job.timeout:g} s"))
        log.error("cache file operation %s%s did not finish within %g s; left to its thread",
                  job.fn.__name__, job.args, job.timeout)
        with self._lock:
            if worker.done or worker.retired:
                return
            worker.retired = True
            self.stuck += 1
        if worker is self._worker:  # its queue goes to a new thread, or fails if too many are stuck
            self._worker = None
            while True:
                try:
                    queued = worker.jobs.get_nowait()
                except queue.Empty:
                    break
                if queued is None:
                    continue
                if self.stuck < MAX_STUCK:
                    self._current().jobs.put(queued)
                elif not queued.future.done():
                    queued.future.set_exception(self._hung())
        worker.jobs.put(None)  # wakes it, should it finish and wait for more


class IOThread:
    def __init__(self, metrics: Metrics, read_timeout: float = READ_TIMEOUT, write_timeout: float = WRITE_TIMEOUT):
        self.metrics = metrics
        self.reads = Lane("semcache-io-read", read_timeout)
        self.writes = Lane("semcache-io-write", write_timeout)
        self._tasks: set[asyncio.Task] = set()

    def run(self, fn: Callable, *args: Any, timeout: float | None = None) -> asyncio.Future:
        """`fn(*args)` on the write lane: all file work but reading."""
        return self.writes.submit(fn, *args, timeout=timeout)

    def read(self, fn: Callable, *args: Any, timeout: float | None = None) -> asyncio.Future:
        """`fn(*args)` on the read lane."""
        return self.reads.submit(fn, *args, timeout=timeout)

    def spawn(self, awaitable: Awaitable) -> asyncio.Task:
        """A task that `settle` waits for."""
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def background(self, fn: Callable, *args: Any, op: str = "remove") -> asyncio.Task:
        """`fn(*args)` on the write lane as an owned task; an OSError is counted as `op` and logged, not raised."""
        async def run() -> None:
            try:
                await self.run(fn, *args)
            except OSError as exc:
                self.error(op, exc)
                log.warning("cache file operation %s%s failed: %s", fn.__name__, args, exc)

        return self.spawn(run())

    def error(self, op: str, exc: BaseException) -> None:
        """Count a failed file operation (op: read, write, remove)."""
        self.metrics.cache_disk_errors.labels(op, errno_label(exc)).inc()

    async def settle(self) -> None:
        """Wait until no task is in flight (those they start included)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def shutdown(self) -> None:
        """Let the threads end (a stuck one ends with its job, which nothing waits for)."""
        self.reads.stop()
        self.writes.stop()
