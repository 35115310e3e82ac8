"""The disk tier's hold on its cache directory: the lock, indexing the files at start, and the moves
and removals of files, which wait while the directory is read-only.

A directory that cannot be locked (a full disk that cannot take the lock file, a read-only mount,
an I/O error) is not given up on until a restart: its files are indexed and served read-only
(nothing written, moved or deleted: the daemon does not own the folder), and the lock is retried
with backoff (RELOCK_FIRST doubling to RELOCK_MAX seconds). Once it is held, the moves and
removals put off meanwhile run and writes start (`on_held`). Indexing reads the headers in batches,
each bounded by the read lane's timeout, so a hung disk costs start-up a few timeouts, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, BinaryIO, Callable

from semcache.cache import entryfile as store
from semcache.cache.cachedir import CacheDirLocked, listing, lock_dir, quarantine, read_metas
from semcache.cache.iothread import IOThread
from semcache.ops.metrics import Metrics

log = logging.getLogger("semcache.cache")

RELOCK_FIRST, RELOCK_MAX = 1.0, 300.0  # seconds between attempts to lock a read-only directory
SCAN_BATCH = 64  # headers read per job at start


async def _nothing() -> None:
    """A removal put off: done at once for whoever waits for it."""


class DirAccess:
    def __init__(self, directory: Path | None, io: IOThread, metrics: Metrics, on_held: Callable[[], Any]):
        self.directory, self.io, self.metrics = directory, io, metrics
        self._on_held = on_held
        self.handle: BinaryIO | None = None  # the lock file, held
        self.readonly = False  # the files are indexed and served, and nothing is changed
        self.relock_first, self.relock_max = RELOCK_FIRST, RELOCK_MAX  # tests shorten them
        self._deferred: list[tuple[str, Path]] = []  # ("remove" or "quarantine", path) put off
        self._relock: asyncio.Task | None = None

    @property
    def usable(self) -> bool:
        """The files can be indexed (held, or read-only)."""
        return self.handle is not None or self.readonly

    async def lock(self) -> None:
        """Take the directory (CacheDirLocked if another daemon has it); one that cannot be locked
        is used read-only, and the lock retried in the background."""
        try:
            self.handle = await self.io.run(lock_dir, self.directory)
        except OSError as exc:
            self.io.error("write", exc)
            log.error("agent cache directory %s cannot be locked (%s): its entries are served read-only and "
                      "nothing is written until it can be (retried in %g s)", self.directory, exc, self.relock_first)
            self.readonly = True
            self._relock = asyncio.ensure_future(self._retry())
            return
        self._on_held()

    async def _retry(self) -> None:
        delay = self.relock_first
        while True:
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.relock_max)
            try:
                self.handle = await self.io.run(lock_dir, self.directory)
                break
            except CacheDirLocked as exc:
                log.error("%s: the agent cache stays read-only", exc)
                return
            except OSError as exc:
                log.info("agent cache directory %s still cannot be locked (%s); next try in %g s",
                         self.directory, exc, delay)
        self.readonly = False
        log.warning("agent cache directory %s is locked now: cache writes start", self.directory)
        deferred, self._deferred = self._deferred, []
        for kind, path in deferred:
            if kind == "remove":
                self.remove(path)
            else:
                self.io.spawn(self.quarantine(path))
        self._on_held()

    async def release(self) -> None:
        """Stop retrying the lock, and release it."""
        if self._relock is not None:
            self._relock.cancel()
            await asyncio.gather(self._relock, return_exceptions=True)
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    async def scan(self, check: Callable[[store.EntryMeta, dict], None]) -> tuple[list, list, list]:
        """(files, paths to quarantine, (path, error) of files left unread), as cachedir.read_metas;
        a folder that cannot be listed is indexed as empty (its files stay for a later start)."""
        try:
            paths = await self.io.read(listing, self.directory, not self.readonly)
        except OSError as exc:
            self.io.error("read", exc)
            log.error("cannot list the agent cache folder %s: %s; starting without its entries", self.directory, exc)
            return [], [], []
        found: tuple[list, list, list] = ([], [], [])
        for i in range(0, len(paths), SCAN_BATCH):
            batch = paths[i : i + SCAN_BATCH]
            try:
                parts = await self.io.read(read_metas, batch, check)
            except OSError as exc:  # timed out: the batch is left for a later start
                parts = ([], [], [(path, exc) for path in batch])
            for whole, part in zip(found, parts):
                whole += part
        return found

    async def quarantine(self, path: Path) -> None:
        """Move a refused file aside (put off while read-only); counted once moved."""
        if self.handle is None:
            self._deferred.append(("quarantine", path))
            return
        try:
            await self.io.run(quarantine, self.directory, path)
        except OSError as exc:  # left in place (and out of the index): retried at the next start
            self.io.error("remove", exc)
            log.error("cannot move %s to quarantine: %s", path, exc)
            return
        self.metrics.cache_quarantined.inc()

    def remove(self, path: Path) -> asyncio.Task:
        """Delete a file in the background (put off while read-only); the removal's task."""
        if self.handle is None:
            self._deferred.append(("remove", path))
            return self.io.spawn(_nothing())
        return self.io.background(store.remove, path)

    def touch(self, path: Path, when: float) -> None:
        """Record a use in a file's mtime (none while read-only)."""
        if self.handle is not None:
            self.io.background(store.touch, path, when, op="write")
