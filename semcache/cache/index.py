"""The agent cache: which stored KV serves which prompt, in memory and on disk, within byte budgets.

Everything here runs on the event loop except file work, which goes to one I/O thread (store.py);
arrays are numpy (kvdata.py), so no MLX call is ever made off the MLX thread. Entries are immutable:
a finished sequence stores a new entry (replacing the same agent's entries it extends), and a hit
hands the engine the entry's arrays to copy. Lookup is by token ids: the agent's own entries first,
then the longest prefix among all the tenant's entries (a radix trie); a tenant never sees another's.
Memory past its budget spills least recently used entries (anonymous ones first) to disk; disk past
its budget deletes the oldest files; entries unused for `ttl` seconds are deleted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from semcache.cache import entryfile as store
from semcache.cache.kvdata import KVData
from semcache.cache.disk import READ_RETRY, WRITE_PAUSE, DiskTier
from semcache.cache.entry import ANON, MISS, CacheLimits, Entry, Match, _preferred, common_prefix
from semcache.ops.metrics import Metrics
from semcache.cache.trie import TokenTrie

__all__ = ["ANON", "MISS", "AgentCache", "CacheLimits", "Entry", "Match", "common_prefix"]
log = logging.getLogger("semcache.cache")


class AgentCache(DiskTier):
    def __init__(self, limits: CacheLimits, directory: Path | None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time):
        self.limits = limits
        self.directory = directory
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.fingerprint = ""
        self.entries: dict[str, Entry] = {}
        self.foreign: dict[str, store.StoredFile] = {}  # other models' files: counted, never served
        self._tries: dict[str, TokenTrie] = defaultdict(TokenTrie)
        self._pools: dict[tuple[str, str | None], set[str]] = defaultdict(set)
        self.memory_bytes = self.disk_bytes = self.writing_bytes = 0
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="semcache-io")
        self._tasks: set[asyncio.Task] = set()
        self._lock: Any = None
        self.write_pause, self.read_retry = WRITE_PAUSE, READ_RETRY  # seconds (kvdisk.py: faults)
        self._writes_paused_until = 0.0  # time.monotonic()
        self._skipped_writes = False  # write-through skipped entries during a pause
        self._update_gauges()

    # Lifecycle -------------------------------------------------------------------------------

    async def lock(self) -> None:
        """Take the cache directory (store.CacheDirLocked if another daemon has it). A directory that
        cannot be created or locked (read-only, I/O error) leaves the cache in memory only."""
        if self.directory is not None:
            try:
                self._lock = await self._run(store.lock_dir, self.directory)
            except OSError as exc:
                self._disk_error("write", exc)
                log.error("agent cache directory %s is unusable (%s): caching in memory only", self.directory, exc)

    async def open(self, fingerprint: str) -> None:
        """Index the files on disk from their headers (no arrays): a restarted daemon is warm."""
        self.fingerprint = fingerprint
        if self._lock is None:
            return
        try:
            files, bad, failed = await self._run(store.scan, self.directory)
        except OSError as exc:  # the folder cannot be listed: start cold, files stay for a later start
            self._disk_error("read", exc)
            log.error("cannot list the agent cache folder %s: %s; starting without its entries", self.directory, exc)
            files, bad, failed = [], [], []
        for path in bad:
            await self._quarantine(path)
        for path, exc in failed:  # left in place, not indexed: a later start tries again
            self._disk_error("read", exc)
            log.warning("cannot read cache file %s (%s); not indexed", path, exc)
        for f in files:
            self.disk_bytes += f.size
            if f.meta.fingerprint != fingerprint:
                self.foreign[f.meta.key] = f
                continue
            m = f.meta
            self._index(Entry(m.key, m.tenant, m.agent, m.named, f.tokens, m.dtype, m.created, m.last_use,
                              path=f.path, file_bytes=f.size))
        self.expire()
        self._enforce_disk()
        self._update_gauges()
        log.info("agent cache: %d entries on disk for this model (%d of other models, %d quarantined, "
                 "%d unreadable), %s", len(self.entries), len(self.foreign), len(bad), len(failed), self.directory)

    async def settle(self) -> None:
        """Wait until no file work (writes, reads, removals) is in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Write memory entries not yet on disk, finish all file work, release the directory."""
        for entry in list(self.entries.values()):
            if entry.dirty and self.directory is not None and self._lock is not None:
                self._schedule_write(entry)
        await self.settle()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self._io.shutdown(wait=True)

    # Lookup and use --------------------------------------------------------------------------

    def lookup(self, tenant: str, agent: str | None, prompt_ids: list[int]) -> Match:
        """The entry sharing the longest token prefix with the prompt (at least one token is left
        to compute). The agent's own entries win ties; below `min_prefix` tokens it is a miss."""
        limit = len(prompt_ids) - 1
        if limit < max(1, self.limits.min_prefix):
            return MISS
        best = MISS
        now = time.monotonic()
        if agent is not None:
            ids = np.asarray(prompt_ids, dtype=np.int32)
            for entry in self._pool(tenant, agent):
                if entry.retry_at > now:
                    continue
                n = min(common_prefix(entry.tokens, ids), limit)
                if n > best.num_tokens or (n == best.num_tokens and _preferred(entry, best.entry)):
                    best = Match(entry, n)
        trie = self._tries.get(tenant)
        if trie is not None:
            n, keys = trie.longest(prompt_ids)
            n = min(n, limit)
            picked = self._pick(keys, now) if n > best.num_tokens else None
            if picked is not None:
                best = Match(picked, n)
        return best if best.num_tokens >= self.limits.min_prefix else MISS

    def record(self, match: Match, num_prompt_tokens: int, from_disk: bool) -> None:
        """Count an admitted request's lookup result and mark its entry used. A hit reused all it
        could (the whole entry, or the whole prompt but its last token); a partial one diverged."""
        entry = match.entry
        if entry is None:
            result = "miss"
        else:
            whole = match.num_tokens >= min(entry.num_tokens, num_prompt_tokens - 1)
            result = "partial" if not whole else "disk_hit" if from_disk else "memory_hit"
            entry.last_use = self.clock()
            self.metrics.cache_tokens_reused.inc(match.num_tokens)
            if entry.path is not None:
                self._background(store.touch, entry.path, entry.last_use)
        self.metrics.cache_lookups.labels(result).inc()

    def fetch(self, entry: Entry) -> asyncio.Future | None:
        """Start making `entry` resident; None if it already is. The future's result is False
        when the file turned out to be unusable (it is quarantined and the entry is gone)."""
        if entry.data is not None or entry.removed:
            return None
        if entry.pending is not None:  # spilled, still being written: take it back
            data, entry.pending = entry.pending, None
            self.writing_bytes -= data.nbytes
            self._attach(entry, data)
            return None
        if entry.loading is None:
            entry.loading = self._spawn(self._read(entry))
        return entry.loading

    # Storing ---------------------------------------------------------------------------------

    def put(self, tenant: str, agent: str | None, token_ids: list[int], data: KVData) -> Entry | None:
        """Store a finished sequence's KV for its agent, replacing the agent's entries it extends."""
        if data.num_tokens == 0:
            return None
        tokens = np.asarray(token_ids[: data.num_tokens], dtype=np.int32)
        now = self.clock()
        replaced = []
        for old in self._pool(tenant, agent):
            shared = common_prefix(old.tokens, tokens)
            if shared == old.num_tokens:
                replaced.append(old)
            elif shared == len(tokens):  # an entry of this agent already holds all of it
                old.last_use = now
                return old
        key = secrets.token_hex(8)
        entry = Entry(key, tenant, agent or ANON + key[:12], agent is not None, tokens, data.dtype, now, now,
                      data=data, dirty=True)
        for old in replaced:
            if old.path is not None and old.writing is None:
                entry.superseded.append((old.path, old.file_bytes))
                old.path = None  # its file now belongs to the new entry, until that one is written
            entry.superseded += old.superseded
            old.superseded = []
            self._remove(old, "replaced")
        self._index(entry)
        self.memory_bytes += data.nbytes
        if self.limits.write_through:
            self._write_through(entry)
        self._enforce_memory()
        self._update_gauges()
        return entry

    # Management (the /v1/agents API) ------------------------------------------------------------

    def agents(self, tenant: str, agent: str | None = None) -> list[Entry]:
        """The tenant's entries (one agent's, if given), most recently used first."""
        found = self._pool(tenant, agent) if agent is not None else [
            e for e in self.entries.values() if e.tenant == tenant]
        return sorted(found, key=lambda e: -e.last_use)

    async def evict(self, tenant: str, agent: str) -> list[Entry]:
        """Move an agent's entries from memory to disk; returns when the files are written."""
        entries = self.agents(tenant, agent)
        for entry in entries:
            if entry.data is not None:
                self._spill(entry, "request")
        await asyncio.gather(*[e.writing for e in entries if e.writing is not None], return_exceptions=True)
        return [e for e in entries if not e.removed]

    async def delete(self, tenant: str, agent: str) -> int:
        """Remove an agent's entries from memory and disk; returns once the files are gone."""
        entries = self.agents(tenant, agent)
        removals = [task for e in entries for task in self._remove(e, "request")]
        writes = [e.writing for e in entries if e.writing is not None]
        await asyncio.gather(*removals, *writes, return_exceptions=True)
        return len(entries)

    async def purge(self, tenant: str) -> int:
        """Delete every entry of a tenant, of every model (its keys are gone); returns the count."""
        entries = [e for e in self.entries.values() if e.tenant == tenant]
        tasks = [task for e in entries for task in self._remove(e, "purge")]
        tasks += [e.writing for e in entries if e.writing is not None]
        foreign = [k for k, f in self.foreign.items() if f.meta.tenant == tenant]
        tasks += [self._drop_foreign(k, "purge") for k in foreign]
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(entries) + len(foreign)

    async def switch(self, fingerprint: str) -> None:
        """Another model was loaded: this model's entries go to disk and are kept under their
        fingerprint (served again if it returns); the new model's files become servable."""
        for entry in list(self.entries.values()):
            if entry.dirty and self._lock is not None:
                self._schedule_write(entry)
        await self.settle()
        for entry in list(self.entries.values()):
            if entry.path is not None:  # hand its file to the foreign index before forgetting it
                meta = self._meta(entry, "native")
                self.foreign[entry.key] = store.StoredFile(entry.path, meta, entry.file_bytes, entry.tokens)
                entry.path = None  # the bytes stay counted: the file is now a foreign one
            self._remove(entry, "model_swap")
        self.fingerprint = fingerprint
        for key in [k for k, f in self.foreign.items() if f.meta.fingerprint == fingerprint]:
            f = self.foreign.pop(key)
            m = f.meta
            self._index(Entry(m.key, m.tenant, m.agent, m.named, f.tokens, m.dtype, m.created, m.last_use,
                              path=f.path, file_bytes=f.size))
        self._update_gauges()

    def expire(self) -> None:
        """Delete entries (and other models' files) unused for longer than the TTL."""
        cutoff = self.clock() - self.limits.ttl
        for entry in [e for e in self.entries.values() if e.last_use < cutoff]:
            self._remove(entry, "ttl")
        for key in [k for k, f in self.foreign.items() if f.meta.last_use < cutoff]:
            self._drop_foreign(key, "ttl")

    # Internals -------------------------------------------------------------------------------

    def _pool(self, tenant: str, agent: str | None) -> list[Entry]:
        if agent is not None and agent.startswith(ANON):
            return [self.entries[k] for k in self._pools.get((tenant, None), ()) if self.entries[k].agent == agent]
        return [self.entries[k] for k in self._pools.get((tenant, agent), ())]

    def _pick(self, keys, now: float) -> Entry | None:
        """Among entries sharing the same prefix: a resident one, then the most recently used
        (None if all those looked at are passed over after a read error)."""
        best = None
        for i, key in enumerate(keys):
            entry = self.entries[key]
            if entry.retry_at <= now and (best is None or _preferred(entry, best)):
                best = entry
            if i >= 32:
                break
        return best

    def _index(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        self._tries[entry.tenant].insert(entry.tokens.tolist(), entry.key)
        self._pools[(entry.tenant, entry.agent if entry.named else None)].add(entry.key)

    def _attach(self, entry: Entry, data: KVData) -> None:
        entry.data = data
        entry.last_use = self.clock()  # about to be used: never the next to spill
        self.memory_bytes += data.nbytes
        self._enforce_memory(keep=entry)
        self._update_gauges()

    def _enforce_memory(self, keep: Entry | None = None) -> None:
        while self.memory_bytes > self.limits.memory_budget:
            victims = [e for e in self.entries.values() if e.data is not None and e is not keep]
            if not victims:
                return
            self._spill(min(victims, key=lambda e: (e.named, e.last_use)), "budget")

    def _spill(self, entry: Entry, reason: str) -> None:
        data, entry.data = entry.data, None
        self.memory_bytes -= data.nbytes
        self.metrics.cache_evictions.labels("memory", reason).inc()
        if entry.dirty and self._writable():  # while writes pause after a failure, it is dropped
            entry.pending = data
            self.writing_bytes += data.nbytes
            self._schedule_write(entry)
        elif entry.path is None:  # no disk tier to spill to: the entry is gone
            self._remove(entry, reason)
        self._update_gauges()


    # Introspection ---------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        """Set the tier gauges now (called after every change, so a scrape never computes them)."""
        for tier in ("memory", "disk", "writing"):
            self.metrics.cache_bytes.labels(tier).set(self._bytes_in(tier))
            self.metrics.cache_entries.labels(tier).set(self._entries_in(tier))

    def _bytes_in(self, tier: str) -> int:
        return {"memory": self.memory_bytes, "disk": self.disk_bytes, "writing": self.writing_bytes}[tier]

    def _entries_in(self, tier: str) -> int:
        if tier == "memory":
            return sum(1 for e in self.entries.values() if e.data is not None)
        if tier == "disk":
            return sum(1 for e in self.entries.values() if e.path is not None) + len(self.foreign)
        return sum(1 for e in self.entries.values() if e.pending is not None)

    def check_integrity(self) -> None:
        """Assert the accounting and index invariants (tests call this after every operation)."""
        live = list(self.entries.values())
        assert self.memory_bytes == sum(e.data.nbytes for e in live if e.data is not None), "memory bytes drifted"
        assert self.writing_bytes == sum(e.pending.nbytes for e in live if e.pending is not None)
        on_disk = sum(e.file_bytes for e in live if e.path is not None) + sum(f.size for f in self.foreign.values())
        on_disk += sum(size for e in live for _, size in e.superseded)
        assert self.disk_bytes == on_disk, "disk bytes drifted"
        assert not any(e.data is not None and e.pending is not None for e in live)
        assert sum(len(t) for t in self._tries.values()) == len(live), "trie out of step with entries"
        assert sum(len(keys) for keys in self._pools.values()) == len(live), "agent pools out of step"
        largest = max((e.data.nbytes for e in live if e.data is not None), default=0)
        assert self.memory_bytes - largest <= self.limits.memory_budget, "memory budget exceeded by more than one entry"
