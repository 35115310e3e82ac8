"""The agent cache's I/O thread: file work off the event loop, every task on it owned until it ends.

One thread, so file operations run in the order they were started. An OSError says nothing about the
file it hit (disk full, I/O error...): `error` counts it by errno name in semcache_cache_disk_errors_total.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
from typing import Any, Awaitable, Callable

from semcache.ops.metrics import Metrics

log = logging.getLogger("semcache.cache")

# errno names kept as metric labels (anything else is "other": the label set stays small)
_ERRNO_LABELS = frozenset({"ENOSPC", "EDQUOT", "EIO", "EROFS", "EACCES", "EPERM", "ENOENT", "EMFILE", "ENFILE"})


def errno_label(exc: BaseException) -> str:
    name = errno.errorcode.get(getattr(exc, "errno", None) or 0, "")
    return name if name in _ERRNO_LABELS else "other"


class IOThread:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="semcache-io")
        self._tasks: set[asyncio.Task] = set()

    def run(self, fn: Callable, *args: Any) -> asyncio.Future:
        """`fn(*args)` on the I/O thread."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def spawn(self, awaitable: Awaitable) -> asyncio.Task:
        """A task that `settle` waits for."""
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def background(self, fn: Callable, *args: Any, op: str = "remove") -> asyncio.Task:
        """`fn(*args)` on the I/O thread as an owned task; an OSError is counted as `op` and logged, not raised."""
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
        self._pool.shutdown(wait=True)
