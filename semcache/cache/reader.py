"""The reading side of the disk tier: entry files loaded on the read lane, checked, handed to the index.

Part of the disk tier (disk.py), which holds one Reader. A file is read whole and checked before
anything uses it: its content hash (entryfile.py), its KV against the model's layout (layout.py), its
metadata against the index's entry. Faults: a bad file is rejected (the tier quarantines it); a
vanished one is forgotten; an I/O error or a read past the read lane's timeout says nothing about
the file: it is counted, the request runs cold (a miss) and lookups pass the entry over for
`read_retry` seconds, as suspect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
from prometheus_async.aio import time as timed

from semcache.cache import entryfile as store
from semcache.cache.entry import Entry
from semcache.cache.iothread import IOThread
from semcache.cache.kvdata import KVData
from semcache.cache.layout import KVLayout, tensor_table
from semcache.ops.metrics import Metrics

log = logging.getLogger("semcache.cache")

READ_RETRY = 30.0  # seconds lookups pass over an entry whose file could not be read


def read_entry(path: Path, layout: KVLayout | None) -> tuple[store.EntryMeta, np.ndarray, KVData]:
    """A whole entry, checked against the model's KV layout (if known) before anything uses it."""
    meta, tensors = store.read(path)
    if layout is not None:
        layout.check(tensor_table(tensors), meta)
    tokens, data = KVData.from_tensors(tensors, meta.dtype, meta.encoding)
    return meta, tokens, data


class Reader:
    def __init__(self, io: IOThread, metrics: Metrics, model: Callable[[], tuple[str, KVLayout | None]],
                 attach: Callable[[Entry, KVData], Any], lose: Callable[[Entry], Any],
                 reject: Callable[[Entry], Awaitable]):
        """`model`: the fingerprint and KV layout files must have; `lose` drops an entry whose file is
        gone, `reject` one whose file is bad."""
        self.io, self.metrics, self._model = io, metrics, model
        self._attach, self._lose, self._reject = attach, lose, reject
        self.read_retry = READ_RETRY  # seconds

    def read(self, entry: Entry) -> asyncio.Future:
        """Read the entry's file (on the read lane); True once `attach` has its data, False if the
        entry is gone, its file unusable or the read failed."""
        if entry.loading is None:
            entry.loading = self.io.spawn(self._read(entry))
        return entry.loading

    async def _read(self, entry: Entry) -> bool:
        try:
            path = entry.path
            if entry.removed or path is None:  # removed before the read started
                return False
            fingerprint, layout = self._model()
            try:
                meta, tokens, data = await timed(self.metrics.cache_disk_read_seconds,
                                                 self.io.read(read_entry, path, layout))
                if meta.key != entry.key or meta.fingerprint != fingerprint or not np.array_equal(
                        tokens, entry.tokens):
                    raise store.CorruptEntry("metadata does not match the index")
            except Exception as exc:  # whatever is wrong with the file: never a wrong answer
                if not (entry.removed or entry.path != path):  # else already gone (and its file with it)
                    await self._failed(entry, path, exc)
                return False
            if entry.removed:
                return False
            self._attach(entry, data)
            return True
        finally:
            entry.loading = None

    async def _failed(self, entry: Entry, path: Path, exc: Exception) -> None:
        if not isinstance(exc, OSError):
            log.warning("cache file %s is unusable (%s); moved to quarantine", path, exc)
            await self._reject(entry)
            return
        self.io.error("read", exc)
        if isinstance(exc, FileNotFoundError):
            log.warning("cache file %s is gone; its entry is dropped", path)
            self._lose(entry)
        else:
            log.warning("cannot read cache file %s (%s); a miss, retried after %.0f s", path, exc, self.read_retry)
            entry.retry_at = time.monotonic() + self.read_retry
