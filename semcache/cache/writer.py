"""The writing tier: entry files being written, and the data of spilled entries held until they are.

Part of the disk tier (disk.py), which holds one Writer. After a failed write (disk full...),
write-through pauses for `write_pause` seconds rather than retry at every request, twice as long
after each failure in a row (up to MAX_WRITE_PAUSE); what it skipped is written when writes resume.
A spilled entry whose write fails is dropped (its data was only here).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from prometheus_async.aio import time as timed

from semcache.cache import entryfile as store
from semcache.cache.entry import Entry
from semcache.cache.iothread import IOThread
from semcache.cache.kvdata import KVData
from semcache.ops.metrics import Metrics

log = logging.getLogger("semcache.cache")

WRITE_PAUSE = 30.0  # seconds without write-through after a failed write
MAX_WRITE_PAUSE = 600.0  # the longest pause, after failures in a row


def _write_entry(directory: Path, meta: store.EntryMeta, tokens: np.ndarray, data: KVData) -> store.StoredFile:
    return store.write(directory, meta, data.to_tensors(tokens, meta.encoding))


class Writer:
    def __init__(self, io: IOThread, metrics: Metrics, encoding: str, meta: Callable[[Entry, str], store.EntryMeta],
                 written: Callable[[Entry, store.StoredFile], Any], drop: Callable[[Entry, str], Any]):
        self.io, self.metrics, self.encoding = io, metrics, encoding
        self._meta, self._written, self._drop = meta, written, drop
        self.directory: Path | None = None  # where files go, once the disk tier holds its lock
        self.pending: dict[str, Entry] = {}  # spilled entries, by key
        self.writing_bytes = 0  # their data's bytes
        self.write_pause = WRITE_PAUSE  # seconds (tests shorten it)
        self._paused_until = 0.0  # time.monotonic()
        self._skipped = False  # write-through skipped entries during a pause
        self._failures = 0  # failed writes in a row (each one after a pause)
        self._update_gauges()

    def resume(self, directory: Path) -> None:
        """Writes may start in `directory` (held now): the next write-through also writes the dirty
        entries made while it was not."""
        self.directory, self._skipped = directory, True

    def writable(self) -> bool:
        """A directory to write to, and no pause after a failed write."""
        return self.directory is not None and time.monotonic() >= self._paused_until

    def write_through(self, entry: Entry, entries: Iterable[Entry]) -> None:
        """Write a new entry now, unless writes are paused; on resuming, also those of `entries`
        the pause skipped (dirty and resident)."""
        if not self.writable():
            self._skipped = self.directory is not None
            return
        if self._skipped:
            self._skipped = False
            for other in entries:
                if other.dirty and other.data is not None:
                    self.schedule(other)
        self.schedule(entry)

    def write_dirty(self, entries: Iterable[Entry]) -> None:
        """Write those of `entries` not on disk yet (paused or not), if there is a directory."""
        if self.directory is not None:
            for entry in entries:
                if entry.dirty:
                    self.schedule(entry)

    def spill(self, entry: Entry, data: KVData) -> bool:
        """Hold the data of a dirty entry leaving memory until its file is written; False if it cannot be."""
        if not (entry.dirty and self.writable()):
            return False
        entry.pending = data
        self.pending[entry.key] = entry
        self.writing_bytes += data.nbytes
        self.schedule(entry)
        self._update_gauges()
        return True

    def release(self, entry: Entry) -> KVData | None:
        """The held data of a spilled entry (None if none), no longer held."""
        data, entry.pending = entry.pending, None
        if data is not None:
            del self.pending[entry.key]
            self.writing_bytes -= data.nbytes
            self._update_gauges()
        return data

    def schedule(self, entry: Entry) -> None:
        if entry.writing is None:
            entry.writing = self.io.spawn(self._write(entry))

    async def _write(self, entry: Entry) -> None:
        data = entry.data if entry.data is not None else entry.pending
        try:
            if data is None or entry.removed:  # replaced or deleted before the task started: nothing to write
                return
            meta = self._meta(entry, self.encoding if data.quantizable else "native")
            stored = await timed(self.metrics.cache_disk_write_seconds,
                                 self.io.run(_write_entry, self.directory, meta, entry.tokens, data))
        except Exception as exc:  # disk full, I/O error...: the entry lives on in memory, or is dropped
            self._failed(entry, exc)
            if entry.pending is not None:
                self._drop(entry, "write_error")
            return
        finally:
            entry.writing = None
        self._failures = 0
        if entry.removed:  # deleted while it was being written
            await self.io.background(store.remove, stored.path)
            return
        self.release(entry)
        self._written(entry, stored)

    def _failed(self, entry: Entry, exc: Exception) -> None:
        """Count the failure; an OSError (ENOSPC, EIO...) pauses writes instead of retrying each turn."""
        self.io.error("write", exc)
        if not isinstance(exc, OSError):
            log.error("cannot write cache entry %s for %s: %s", entry.key, entry.agent, exc)
            return
        was_writable = self.writable()
        self._failures += was_writable  # writes failing together, before a pause, count once
        pause = min(self.write_pause * 2 ** max(0, self._failures - 1), MAX_WRITE_PAUSE)
        self._paused_until = time.monotonic() + pause
        self._skipped = True  # the entry that failed is written again with the rest, once writes resume
        (log.error if was_writable else log.warning)(
            "cannot write cache entry %s for %s: %s; cache writes paused for %.0f s",
            entry.key, entry.agent, exc, pause)

    def _update_gauges(self) -> None:
        self.metrics.cache_bytes.labels("writing").set(self.writing_bytes)
        self.metrics.cache_entries.labels("writing").set(len(self.pending))

    def check_integrity(self, live: list[Entry]) -> None:
        """Assert the writing tier's accounting against the index's entries."""
        assert self.writing_bytes == sum(e.pending.nbytes for e in live if e.pending is not None)
        assert set(self.pending) == {e.key for e in live if e.pending is not None}, "writing tier out of step"
