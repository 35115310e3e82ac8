"""The agent cache's disk half: writing, reading, quarantining and budgeting entry files.

A mixin of AgentCache (it uses the cache's index and counters); all file work runs on the cache's
one I/O thread through `_run`, and every background task is owned through `_spawn`.

Faults: a file that does not parse or fails its hash is quarantined (it will never be good). An
I/O error (OSError) says nothing about the file: it is counted in semcache_cache_disk_errors_total,
the request runs cold, and the file is left alone. After a failed write (disk full...), write-through
pauses for `write_pause` seconds rather than retry at every request; what it skipped is written when
writes resume. An entry whose file could not be read is passed over by lookups for `read_retry` s.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from pathlib import Path

import numpy as np
from prometheus_async.aio import time as timed

from semcache.cache import entryfile as store
from semcache.cache.entry import Entry
from semcache.cache.kvdata import KVData

log = logging.getLogger("semcache.cache")

WRITE_PAUSE = 30.0  # seconds without write-through after a failed write
READ_RETRY = 30.0  # seconds lookups pass over an entry whose file could not be read
# errno names kept as metric labels (anything else is "other": the label set stays small)
_ERRNO_LABELS = frozenset({"ENOSPC", "EDQUOT", "EIO", "EROFS", "EACCES", "EPERM", "ENOENT", "EMFILE", "ENFILE"})


def errno_label(exc: BaseException) -> str:
    name = errno.errorcode.get(getattr(exc, "errno", None) or 0, "")
    return name if name in _ERRNO_LABELS else "other"


def _read_entry(path: Path) -> tuple[store.EntryMeta, np.ndarray, KVData]:
    meta, tensors = store.read(path)
    tokens, data = KVData.from_tensors(tensors, meta.dtype, meta.encoding)
    return meta, tokens, data


def _write_entry(directory: Path, meta: store.EntryMeta, tokens: np.ndarray, data: KVData) -> store.StoredFile:
    return store.write(directory, meta, data.to_tensors(tokens, meta.encoding))


class DiskTier:
    """File operations of AgentCache; not usable on its own."""

    def _enforce_disk(self) -> None:
        while self.disk_bytes > self.limits.disk_budget:
            ours = [e for e in self.entries.values() if e.path is not None]
            oldest = min(ours, key=lambda e: e.last_use, default=None)
            other = min(self.foreign.values(), key=lambda f: f.meta.last_use, default=None)
            if other is not None and (oldest is None or other.meta.last_use < oldest.last_use):
                self._drop_foreign(other.meta.key, "budget")
            elif oldest is None:
                return
            elif oldest.data is None and oldest.pending is None:
                self._remove(oldest, "budget")
            else:  # resident: it keeps living in memory, to be written again if spilled
                self.disk_bytes -= oldest.file_bytes
                self._background(store.remove, oldest.path)
                oldest.path, oldest.file_bytes, oldest.dirty = None, 0, True
            self.metrics.cache_evictions.labels("disk", "budget").inc()
        self._update_gauges()

    def _drop_foreign(self, key: str, reason: str) -> asyncio.Task:
        f = self.foreign.pop(key)
        self.disk_bytes -= f.size
        self._update_gauges()
        return self._background(store.remove, f.path)

    def _drop_superseded(self, entry: Entry) -> list[asyncio.Task]:
        tasks = []
        for path, size in entry.superseded:
            self.disk_bytes -= size
            tasks.append(self._background(store.remove, path))
        entry.superseded = []
        return tasks

    def _remove(self, entry: Entry, reason: str) -> list[asyncio.Task]:
        """Forget the entry; returns the file removals it started."""
        if entry.removed:
            return []
        entry.removed = True
        superseded = self._drop_superseded(entry)
        del self.entries[entry.key]
        self._tries[entry.tenant].remove(entry.tokens.tolist(), entry.key)
        self._pools[(entry.tenant, entry.agent if entry.named else None)].discard(entry.key)
        if entry.data is not None:
            self.memory_bytes -= entry.data.nbytes
        if entry.pending is not None:
            self.writing_bytes -= entry.pending.nbytes
        entry.data = entry.pending = None
        self._update_gauges()
        if entry.path is None:
            return superseded
        self.disk_bytes -= entry.file_bytes
        path, entry.path = entry.path, None
        self._update_gauges()
        return superseded + [self._background(store.remove, path)]

    def _schedule_write(self, entry: Entry) -> None:
        if entry.writing is None:
            entry.writing = self._spawn(self._write(entry))

    def _writable(self) -> bool:
        """A disk tier that is not pausing after a failed write."""
        return self._lock is not None and time.monotonic() >= self._writes_paused_until

    def _write_through(self, entry: Entry) -> None:
        """Write a new entry now, unless writes are paused; on resuming, also those the pause skipped."""
        if not self._writable():
            self._skipped_writes = self._lock is not None
            return
        if self._skipped_writes:
            self._skipped_writes = False
            for other in self.entries.values():
                if other.dirty and other.data is not None:
                    self._schedule_write(other)
        self._schedule_write(entry)

    async def _write(self, entry: Entry) -> None:
        data = entry.data if entry.data is not None else entry.pending
        meta = self._meta(entry, self.limits.encoding if data.quantizable else "native")
        try:
            stored = await timed(self.metrics.cache_disk_write_seconds,
                                 self._run(_write_entry, self.directory, meta, entry.tokens, data))
        except Exception as exc:  # disk full, I/O error...: the entry lives on in memory, or is dropped
            self._write_failed(entry, exc)
            if entry.pending is not None:
                self._remove(entry, "write_error")
            return
        finally:
            entry.writing = None
        if entry.removed:  # deleted while it was being written
            await self._background(store.remove, stored.path)
            return
        entry.path, entry.file_bytes, entry.dirty = stored.path, stored.size, False
        self.disk_bytes += stored.size
        self._drop_superseded(entry)
        if entry.pending is not None:
            self.writing_bytes -= entry.pending.nbytes
            entry.pending = None
        self._enforce_disk()
        self._update_gauges()

    def _write_failed(self, entry: Entry, exc: Exception) -> None:
        """Count the failure; an OSError (ENOSPC, EIO...) pauses writes instead of retrying each turn."""
        self._disk_error("write", exc)
        if not isinstance(exc, OSError):
            log.error("cannot write cache entry %s for %s: %s", entry.key, entry.agent, exc)
            return
        was_writable = self._writable()
        self._writes_paused_until = time.monotonic() + self.write_pause
        (log.error if was_writable else log.warning)(
            "cannot write cache entry %s for %s: %s; cache writes paused for %.0f s",
            entry.key, entry.agent, exc, self.write_pause)

    def _meta(self, entry: Entry, encoding: str) -> store.EntryMeta:
        return store.EntryMeta(entry.key, self.fingerprint, entry.tenant, entry.agent, entry.named,
                               entry.num_tokens, entry.dtype, encoding, entry.created, entry.last_use)

    async def _read(self, entry: Entry) -> bool:
        try:
            path = entry.path
            if entry.removed or path is None:  # removed before the read started
                return False
            try:
                meta, tokens, data = await timed(self.metrics.cache_disk_read_seconds, self._run(_read_entry, path))
                if meta.key != entry.key or meta.fingerprint != self.fingerprint or not np.array_equal(
                        tokens, entry.tokens):
                    raise store.CorruptEntry("metadata does not match the index")
            except Exception as exc:  # whatever is wrong with the file: never a wrong answer
                if not (entry.removed or entry.path != path):  # else already gone (and its file with it)
                    await self._read_failed(entry, path, exc)
                return False
            if entry.removed:
                return False
            self._attach(entry, data)
            return True
        finally:
            entry.loading = None

    async def _read_failed(self, entry: Entry, path: Path, exc: Exception) -> None:
        """A bad file is quarantined; a vanished one forgotten; an I/O error leaves the file alone
        and makes lookups pass the entry over for a while (the request runs cold: a miss)."""
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            self._disk_error("read", exc)
            log.warning("cannot read cache file %s (%s); a miss, retried after %.0f s", path, exc, self.read_retry)
            entry.retry_at = time.monotonic() + self.read_retry
            return
        entry.path = None
        self.disk_bytes -= entry.file_bytes
        self._remove(entry, "corrupt")
        if isinstance(exc, FileNotFoundError):
            self._disk_error("read", exc)
            log.warning("cache file %s is gone; its entry is dropped", path)
        else:
            log.warning("cache file %s is unusable (%s); moved to quarantine", path, exc)
            await self._quarantine(path)

    async def _quarantine(self, path: Path) -> None:
        try:
            await self._run(store.quarantine, self.directory, path)
        except OSError as exc:  # left in place (and out of the index): retried at the next start
            self._disk_error("remove", exc)
            log.error("cannot move %s to quarantine: %s", path, exc)
            return
        self.metrics.cache_quarantined.inc()

    def _disk_error(self, op: str, exc: BaseException) -> None:
        self.metrics.cache_disk_errors.labels(op, errno_label(exc)).inc()

    def _background(self, fn, *args) -> asyncio.Task:
        """Run a file removal or touch on the I/O thread; an I/O error is counted and logged, not raised."""
        async def run() -> None:
            try:
                await self._run(fn, *args)
            except OSError as exc:
                self._disk_error("write" if fn is store.touch else "remove", exc)
                log.warning("cache file operation %s%s failed: %s", fn.__name__, args, exc)

        return self._spawn(run())

    def _run(self, fn, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _spawn(self, awaitable) -> asyncio.Task:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
