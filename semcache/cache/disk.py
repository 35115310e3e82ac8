"""The disk tier: the cache directory, which entries have a file there, other models' files, and
their bytes within the disk budget.

It owns the files and the Entry fields about them (path, file_bytes, dirty, pending, writing,
loading, retry_at, superseded); the index (index.py) owns the entries and what is in memory, and is
called back through `attach` (a read brought an entry's data back) and `drop` (an entry's data is
lost). Files are in the entry file format (entryfile.py), handled on the I/O threads (iothread.py:
a read lane and a write lane); the directory itself (lock, read-only fallback, indexing at start,
moves and removals) is access.py's; reads go through the reading side (reader.py), writes and the
data of spilled entries through the writing side (writer.py); which files the budgets delete is
diskbudget.py's.

Faults: a file that does not parse, fails its hash or is not this model's KV (layout.py) is
quarantined (it will never be good), and so is an entry the engine failed on (`reject`); an I/O
error says nothing about the file: it is counted, the request runs cold, the file stays.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from semcache.cache import entryfile as store
from semcache.cache.access import DirAccess
from semcache.cache.diskbudget import DiskBudget
from semcache.cache.entry import CacheLimits, Entry
from semcache.cache.iothread import IOThread
from semcache.cache.kvdata import KVData
from semcache.cache.layout import KVLayout
from semcache.cache.ledger import Ledger
from semcache.cache.reader import Reader
from semcache.cache.writer import Writer
from semcache.ops.metrics import Metrics

log = logging.getLogger("semcache.cache")

class DiskTier(DiskBudget):
    def __init__(self, directory: Path | None, limits: CacheLimits, metrics: Metrics,
                 attach: Callable[[Entry, KVData], Any], drop: Callable[[Entry, str], Any],
                 clock: Callable[[], float] = time.time):
        self.directory, self.limits, self.metrics, self.clock = directory, limits, metrics, clock
        self._attach, self._drop = attach, drop
        self.fingerprint = ""
        self.layout: KVLayout | None = None  # the model's, to check files against
        # This model's entries that have a file, by key; other models' files (counted, never served)
        self.stored = Ledger(rank=lambda e: e.last_use, size=lambda e: e.file_bytes, tenant=lambda e: e.tenant)
        self.foreign = Ledger(rank=lambda f: f.meta.last_use, size=lambda f: f.size, tenant=lambda f: f.meta.tenant)
        self.bytes = 0  # of all those files, and of the replaced files not deleted yet
        self._update_gauges()
        self.io = IOThread(metrics, limits.read_timeout, limits.write_timeout)
        self.writer = Writer(self.io, metrics, limits.encoding, self._meta, self._written, drop)
        self.access = DirAccess(directory, self.io, metrics, on_held=lambda: self.writer.resume(directory))
        self.reader = Reader(self.io, metrics, lambda: (self.fingerprint, self.layout), attach, self._lose, self.reject)

    # Lifecycle -------------------------------------------------------------------------------

    async def lock(self) -> None:
        """Take the directory (CacheDirLocked if another daemon has it); one that cannot be locked
        is indexed read-only and locked later (access.py). No directory: memory only."""
        if self.directory is not None:
            await self.access.lock()

    async def open(self, fingerprint: str, layout: KVLayout | None = None) -> tuple[list[Entry], int, int] | None:
        """Index the files from their headers (no arrays): (this model's entries, files quarantined,
        files left unread after an I/O error); None if there is no directory to index."""
        self.fingerprint, self.layout = fingerprint, layout
        if not self.access.usable:
            return None
        files, bad, failed = await self.access.scan(self._check_header)
        for path in bad:
            await self.access.quarantine(path)
        for path, exc in failed:  # left in place, not indexed: a later start tries again
            self.io.error("read", exc)
            log.warning("cannot read cache file %s (%s); not indexed", path, exc)
        now = self.clock()
        for f in files:
            self.bytes += f.size
            self.foreign[f.meta.key] = f.clamped(now)
        return self._adopt(fingerprint), len(bad), len(failed)

    def _check_header(self, meta: store.EntryMeta, header: dict) -> None:
        """At start, on the read lane: a file of this model must hold this model's KV layout."""
        if self.layout is not None and meta.fingerprint == self.fingerprint:
            self.layout.check_header(meta, header)

    async def flush(self, entries: Iterable[Entry]) -> None:
        """Write those of `entries` not on disk yet, and wait until no file work is in flight."""
        self.writer.write_dirty(entries)
        await self.settle()

    async def settle(self) -> None:
        """Wait until no file work (writes, reads, removals) is in flight."""
        await self.io.settle()

    async def close(self, entries: Iterable[Entry]) -> None:
        """Flush `entries` (waiting at most `close_timeout` seconds: file work still unfinished is
        abandoned, and entries not written are lost), release the directory, stop the I/O threads."""
        try:
            await asyncio.wait_for(self.flush(entries), self.limits.close_timeout)
        except asyncio.TimeoutError:
            log.error("cache file work unfinished after %g s at shutdown: abandoned", self.limits.close_timeout)
        self.writer.directory = None
        await self.access.release()
        self.io.shutdown()

    def switch(self, fingerprint: str, layout: KVLayout | None, entries: Iterable[Entry]) -> list[Entry]:
        """Another model (of KV `layout`): the files of `entries` become other-model files, kept under
        the old fingerprint; returns the new model's entries, made from its files."""
        self.layout = layout
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
            self.access.touch(entry.path, entry.last_use)

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
        """Read the entry's file (see Reader.read)."""
        return self.reader.read(entry)

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
            tasks.append(self.access.remove(entry.path))
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
        return self.access.remove(f.path)

    def _drop_superseded(self, entry: Entry) -> list[asyncio.Task]:
        tasks = []
        for path, size in entry.superseded:
            self.bytes -= size
            tasks.append(self.access.remove(path))
        entry.superseded = []
        return tasks

    def _meta(self, entry: Entry, encoding: str) -> store.EntryMeta:
        return store.EntryMeta(entry.key, self.fingerprint, entry.tenant, entry.agent, entry.named,
                               entry.num_tokens, entry.dtype, encoding, entry.created, entry.last_use)

    # Unusable entries ------------------------------------------------------------------------

    def reject(self, entry: Entry) -> asyncio.Future:
        """Drop an entry whose KV must never be served again (its file failed a check, or the engine
        failed on it); its file goes to quarantine. Returns the move (done at once if no file)."""
        path = self._lose(entry) if not entry.removed else None
        return self.io.spawn(self.access.quarantine(path) if path is not None else asyncio.sleep(0))

    def _lose(self, entry: Entry) -> Path | None:
        """Drop an unusable entry; its file, no longer counted, is the caller's (its path returned)."""
        path = entry.path
        if path is not None:
            self._unstore(entry)
            self.bytes -= entry.file_bytes
        self._drop(entry, "corrupt")
        return path

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
