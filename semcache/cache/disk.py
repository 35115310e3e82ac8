"""The disk tier: the cache directory, which entries have a file there, other models' files, and
their bytes within the disk budget.

It owns the files and the Entry fields about them (path, file_bytes, dirty, pending, writing,
loading, retry_at, superseded); the index (index.py) owns the entries and what is in memory, and is
called back through `attach` (a read brought an entry's data back) and `drop` (an entry's data is
lost). Files are in the entry file format (entryfile.py), handled on the I/O thread (iothread.py);
writes and the data of spilled entries go through the writing tier (writer.py); which files the
budgets delete is diskbudget.py's.

Faults: a file that does not parse or fails its hash is quarantined (it will never be good); an
I/O error says nothing about the file: it is counted, the request runs cold, the file stays.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from prometheus_async.aio import time as timed

from semcache.cache import entryfile as store
from semcache.cache.diskbudget import DiskBudget
from semcache.cache.entry import CacheLimits, Entry
from semcache.cache.iothread import IOThread
from semcache.cache.kvdata import KVData
from semcache.cache.ledger import Ledger
from semcache.cache.writer import Writer
from semcache.ops.metrics import Metrics

log = logging.getLogger("semcache.cache")

READ_RETRY = 30.0  # seconds lookups pass over an entry whose file could not be read


def read_entry(path: Path) -> tuple[store.EntryMeta, np.ndarray, KVData]:
    meta, tensors = store.read(path)
    tokens, data = KVData.from_tensors(tensors, meta.dtype, meta.encoding)
    return meta, tokens, data


class DiskTier(DiskBudget):
    def __init__(self, directory: Path | None, limits: CacheLimits, metrics: Metrics,
                 attach: Callable[[Entry, KVData], Any], drop: Callable[[Entry, str], Any]):
        self.directory, self.limits, self.metrics = directory, limits, metrics
        self._attach, self._drop = attach, drop
        self.fingerprint = ""
        # This model's entries that have a file, by key; other models' files (counted, never served)
        self.stored = Ledger(rank=lambda e: e.last_use, size=lambda e: e.file_bytes, tenant=lambda e: e.tenant)
        self.foreign = Ledger(rank=lambda f: f.meta.last_use, size=lambda f: f.size, tenant=lambda f: f.meta.tenant)
        self.bytes = 0  # of all those files, and of the replaced files not deleted yet
        self.read_retry = READ_RETRY  # seconds
        self._lock: Any = None
        self._update_gauges()
        self.io = IOThread(metrics)
        self.writer = Writer(self.io, metrics, limits.encoding, self._meta, self._written, drop)

    # Lifecycle -------------------------------------------------------------------------------

    async def lock(self) -> None:
        """Take the directory (store.CacheDirLocked if another daemon has it). One that cannot be
        created or locked (read-only, I/O error) leaves the cache in memory only."""
        if self.directory is None:
            return
        try:
            self._lock = await self.io.run(store.lock_dir, self.directory)
        except OSError as exc:
            self.io.error("write", exc)
            log.error("agent cache directory %s is unusable (%s): caching in memory only", self.directory, exc)
            return
        self.writer.directory = self.directory

    async def open(self, fingerprint: str) -> tuple[list[Entry], int, int] | None:
        """Index the files from their headers (no arrays): (this model's entries, files quarantined,
        files left unread after an I/O error); None if no directory is held."""
        self.fingerprint = fingerprint
        if self._lock is None:
            return None
        try:
            files, bad, failed = await self.io.run(store.scan, self.directory)
        except OSError as exc:  # the folder cannot be listed: start cold, files stay for a later start
            self.io.error("read", exc)
            log.error("cannot list the agent cache folder %s: %s; starting without its entries", self.directory, exc)
            files, bad, failed = [], [], []
        for path in bad:
            await self._quarantine(path)
        for path, exc in failed:  # left in place, not indexed: a later start tries again
            self.io.error("read", exc)
            log.warning("cannot read cache file %s (%s); not indexed", path, exc)
        for f in files:
            self.bytes += f.size
            self.foreign[f.meta.key] = f
        return self._adopt(fingerprint), len(bad), len(failed)

    async def flush(self, entries: Iterable[Entry]) -> None:
        """Write those of `entries` not on disk yet, and wait until no file work is in flight."""
        self.writer.write_dirty(entries)
        await self.settle()

    async def settle(self) -> None:
        """Wait until no file work (writes, reads, removals) is in flight."""
        await self.io.settle()

    async def close(self, entries: Iterable[Entry]) -> None:
        """Flush `entries`, release the directory, stop the I/O thread."""
        await self.flush(entries)
        if self._lock is not None:
            self._lock.close()
            self._lock = self.writer.directory = None
        self.io.shutdown()

    def switch(self, fingerprint: str, entries: Iterable[Entry]) -> list[Entry]:
        """Another model: the files of `entries` become other-model files, kept under the old
        fingerprint; returns the new model's entries, made from its files."""
        for entry in entries:
            if entry.path is not None:  # its bytes stay counted: the file is now a foreign one
                meta = self._meta(entry, "native")
                self.foreign[entry.key] = store.StoredFile(entry.path, meta, entry.file_bytes, entry.tokens)
                self._unstore(entry)
        return self._adopt(fingerprint)

    def _adopt(self, fingerprint: str) -> list[Entry]:
        """Entries for the other-model files of `fingerprint`, which becomes this tier's model."""
        self.fingerprint = fingerprint
        ours = []
        for key in [k for k, f in self.foreign.items() if f.meta.fingerprint == fingerprint]:
            f = self.foreign.pop(key)
            m = f.meta
            ours.append(Entry(m.key, m.tenant, m.agent, m.named, f.tokens, m.dtype, m.created, m.last_use,
                              path=f.path, file_bytes=f.size))
            self.stored[m.key] = ours[-1]
        self._update_gauges()
        return ours

    # Entries ---------------------------------------------------------------------------------

    def touch(self, entry: Entry) -> None:
        """Record a use in the entry's file (its mtime), if it has one."""
        if entry.path is not None:
            self.io.background(store.touch, entry.path, entry.last_use, op="write")

    def spill(self, entry: Entry, data: KVData) -> bool:
        """The data of an entry leaving memory: kept until written if the entry is not on disk yet.
        False if the entry has no file and gets none (no directory, or writes paused): it is lost."""
        return self.writer.spill(entry, data) or entry.path is not None

    def take_back(self, entry: Entry) -> KVData:
        """The data of a spilled entry whose file is not written yet: it goes back to memory."""
        return self.writer.release(entry)

    def write_through(self, entry: Entry, entries: Iterable[Entry]) -> None:
        """Write a new entry now (see Writer.write_through)."""
        self.writer.write_through(entry, entries)

    def read(self, entry: Entry) -> asyncio.Future:
        """Read the entry's file (one read at a time); True once `attach` has its data, False if the
        entry is gone or its file unusable."""
        if entry.loading is None:
            entry.loading = self.io.spawn(self._read(entry))
        return entry.loading

    def hand_over(self, old: Entry, new: Entry) -> None:
        """`new` replaces `old`: old's file (unless being written) and the files old replaced are
        deleted once `new` is on disk, not before."""
        if old.path is not None and old.writing is None:
            new.superseded.append((old.path, old.file_bytes))
            self._unstore(old)
        new.superseded += old.superseded
        old.superseded = []

    def forget(self, entry: Entry) -> list[asyncio.Task]:
        """The index dropped the entry: release its held data, delete its files; returns the removals."""
        tasks = self._drop_superseded(entry)
        self.writer.release(entry)
        if entry.path is not None:
            self.bytes -= entry.file_bytes
            tasks.append(self.io.background(store.remove, entry.path))
            self._unstore(entry)
        self._update_gauges()
        return tasks

    def drop_foreign(self, which: Callable[[store.StoredFile], bool]) -> list[asyncio.Task]:
        """Delete the other models' files `which` picks; returns the removals, one a file."""
        return [self._drop_foreign(k) for k in [k for k, f in self.foreign.items() if which(f)]]

    def _written(self, entry: Entry, stored: store.StoredFile) -> None:
        entry.path, entry.file_bytes, entry.dirty = stored.path, stored.size, False
        self.stored[entry.key] = entry
        self.bytes += stored.size
        self._drop_superseded(entry)
        self.enforce_budget([entry.tenant])

    def _unstore(self, entry: Entry) -> None:
        """The entry no longer owns its file (its bytes are the caller's to settle)."""
        del self.stored[entry.key]
        entry.path = None

    def _drop_foreign(self, key: str) -> asyncio.Task:
        f = self.foreign.pop(key)
        self.bytes -= f.size
        self._update_gauges()
        return self.io.background(store.remove, f.path)

    def _drop_superseded(self, entry: Entry) -> list[asyncio.Task]:
        tasks = []
        for path, size in entry.superseded:
            self.bytes -= size
            tasks.append(self.io.background(store.remove, path))
        entry.superseded = []
        return tasks

    def _meta(self, entry: Entry, encoding: str) -> store.EntryMeta:
        return store.EntryMeta(entry.key, self.fingerprint, entry.tenant, entry.agent, entry.named,
                               entry.num_tokens, entry.dtype, encoding, entry.created, entry.last_use)

    # Reading ---------------------------------------------------------------------------------

    async def _read(self, entry: Entry) -> bool:
        try:
            path = entry.path
            if entry.removed or path is None:  # removed before the read started
                return False
            try:
                meta, tokens, data = await timed(self.metrics.cache_disk_read_seconds, self.io.run(read_entry, path))
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
            self.io.error("read", exc)
            log.warning("cannot read cache file %s (%s); a miss, retried after %.0f s", path, exc, self.read_retry)
            entry.retry_at = time.monotonic() + self.read_retry
            return
        self._unstore(entry)
        self.bytes -= entry.file_bytes
        self._drop(entry, "corrupt")
        if isinstance(exc, FileNotFoundError):
            self.io.error("read", exc)
            log.warning("cache file %s is gone; its entry is dropped", path)
        else:
            log.warning("cache file %s is unusable (%s); moved to quarantine", path, exc)
            await self._quarantine(path)

    async def _quarantine(self, path: Path) -> None:
        try:
            await self.io.run(store.quarantine, self.directory, path)
        except OSError as exc:  # left in place (and out of the index): retried at the next start
            self.io.error("remove", exc)
            log.error("cannot move %s to quarantine: %s", path, exc)
            return
        self.metrics.cache_quarantined.inc()

    def _update_gauges(self) -> None:
        """Set the disk gauges now (after every change, so a scrape never computes them)."""
        self.metrics.cache_bytes.labels("disk").set(self.bytes)
        self.metrics.cache_entries.labels("disk").set(len(self.stored) + len(self.foreign))

    def check_integrity(self, live: list[Entry]) -> None:
        """Assert the disk and writing accounting against the index's entries."""
        self.writer.check_integrity(live)
        assert set(self.stored) == {e.key for e in live if e.path is not None}, "stored files out of step"
        on_disk = sum(e.file_bytes for e in live if e.path is not None) + sum(f.size for f in self.foreign.values())
        on_disk += sum(size for e in live for _, size in e.superseded)
        assert self.bytes == on_disk, "disk bytes drifted"
