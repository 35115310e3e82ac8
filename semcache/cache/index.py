"""The agent cache's index: which stored KV serves which prompt, within the memory budget; files are
the disk tier's (disk.py), which the index holds and calls.

Everything here runs on the event loop; file work goes to the disk tier's I/O threads. Arrays are
numpy (kvdata.py), so no MLX call is ever made off the MLX thread. Entries are immutable: a finished
sequence stores a new entry (replacing the same agent's entries it extends), and a hit hands the
engine the entry's arrays to copy. Lookup is by token ids: the agent's own entries first, then the
longest prefix among all the tenant's entries (a radix trie); a tenant never sees another's.
Memory past its budget spills least recently used entries (anonymous ones first) to disk; disk past
its budget deletes the oldest files; entries unused for `ttl` seconds are deleted. With a tenant
share, a tenant past its share of a budget loses its own least recently used entries first.
Entries are kept in Ledgers (ledger.py) and found through the catalog (catalog.py), so every
operation is O(log n) or better in the number of entries: nothing recounts.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Callable

import numpy as np

from semcache.cache.catalog import Catalog
from semcache.cache.disk import DiskTier
from semcache.cache.entry import ANON, MISS, CacheLimits, Entry, Match, common_prefix, preferred
from semcache.cache.kvdata import KVData
from semcache.cache.layout import KVLayout
from semcache.cache.ledger import Ledger
from semcache.ops.metrics import Metrics

__all__ = ["ANON", "MISS", "AgentCache", "CacheLimits", "Entry", "Match", "common_prefix"]
log = logging.getLogger("semcache.cache")


class AgentCache:
    def __init__(self, limits: CacheLimits, directory: Path | None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time):
        self.limits = limits
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.entries = Ledger(rank=lambda e: e.last_use, tenant=lambda e: e.tenant)  # all, oldest first
        # Resident entries, in the order they spill: background and anonymous ones first, then by last use
        self.resident = Ledger(rank=lambda e: (e.named and not e.background, e.last_use),
                               size=lambda e: e.data.nbytes, tenant=lambda e: e.tenant)
        self.catalog = Catalog(self.entries)
        self._update_gauges()
        self.disk = DiskTier(directory, limits, self.metrics, attach=self._attach, drop=self._remove, clock=clock)

    memory_bytes = property(lambda self: self.resident.bytes)
    # The disk tier's counts and write pause, as tests read (and shorten) them
    disk_bytes = property(lambda self: self.disk.bytes)
    writing_bytes = property(lambda self: self.disk.writer.writing_bytes)
    foreign = property(lambda self: self.disk.foreign)

    write_pause = property(lambda self: self.disk.writer.write_pause,
                           lambda self, seconds: setattr(self.disk.writer, "write_pause", seconds))

    # Lifecycle -------------------------------------------------------------------------------

    async def lock(self) -> None:
        """Take the cache directory (CacheDirLocked if another daemon has it; else see DiskTier.lock)."""
        await self.disk.lock()

    async def open(self, fingerprint: str, layout: KVLayout | None = None) -> None:
        """Index the files on disk from their headers (no arrays; of this model's KV `layout`): warm."""
        found = await self.disk.open(fingerprint, layout)
        if found is None:
            return
        ours, bad, failed = found
        for entry in ours:
            self._index(entry)
        self.expire()
        self.disk.enforce_budget({*self.disk.stored.tenants(), *self.disk.foreign.tenants()})
        self._update_gauges()
        log.info("agent cache: %d entries on disk for this model (%d of other models, %d quarantined, "
                 "%d unreadable), %s", len(self.entries), len(self.foreign), bad, failed, self.disk.directory)

    async def settle(self) -> None:
        """Wait until no file work (writes, reads, removals) is in flight."""
        await self.disk.settle()

    async def close(self) -> None:
        """Write memory entries not yet on disk, finish all file work, release the directory."""
        await self.disk.close(list(self.entries.values()))

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
            for entry in self.catalog.pool(tenant, agent):
                if entry.retry_at > now:
                    continue
                n = min(common_prefix(entry.tokens, ids), limit)
                if n > best.num_tokens or (n == best.num_tokens and preferred(entry, best.entry)):
                    best = Match(entry, n)
        n, keys = self.catalog.longest(tenant, prompt_ids)
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
            self.disk.touch(entry)
        self.metrics.cache_lookups.labels(result).inc()

    def fetch(self, entry: Entry) -> asyncio.Future | None:
        """Start making `entry` resident; None if it already is. The future's result is False
        when the file turned out to be unusable (it is quarantined and the entry is gone)."""
        if entry.data is not None or entry.removed:
            return None
        if entry.pending is not None:  # spilled, still being written: take it back
            self._attach(entry, self.disk.take_back(entry))
            return None
        return self.disk.read(entry)

    # Storing ---------------------------------------------------------------------------------

    def put(self, tenant: str, agent: str | None, token_ids: list[int], data: KVData, background: bool = False,
            fresh_start: bool = False) -> Entry | None:
        """Store a finished sequence's KV for its agent, replacing the agent's entries it extends
        (with `fresh_start`, after a client compacted its context, all of them). A `background`
        entry (a client's side request) is evicted first and never evicts another from memory. Fewer
        tokens than `min_prefix` could never be hit: they are not stored (None)."""
        if data.num_tokens < max(1, self.limits.min_prefix):
            return None
        tokens = np.asarray(token_ids[: data.num_tokens], dtype=np.int32)
        now = self.clock()
        holder, replaced = self.catalog.extended(tenant, agent, tokens, fresh_start)
        if holder is not None:  # an entry of this agent already holds all of it
            holder.last_use = now
            return holder
        key = secrets.token_hex(8)
        entry = Entry(key, tenant, agent or ANON + key[:12], agent is not None, tokens, data.dtype, now, now,
                      data=data, dirty=True, background=background)
        for old in replaced:
            self.disk.hand_over(old, entry)
            self._remove(old, "replaced")
        self._index(entry)
        self.resident[key] = entry
        if self.limits.write_through:
            self.disk.write_through(entry, self.entries.values())
        self._enforce_memory(tenant, newcomer=entry if background else None)
        self._update_gauges()
        return entry

    # Management (the /v1/agents API) ------------------------------------------------------------

    def agents(self, tenant: str, agent: str | None = None) -> list[Entry]:
        """The tenant's entries (one agent's, if given), most recently used first."""
        found = self.catalog.pool(tenant, agent) if agent is not None else self.entries.of(tenant)
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
        entries = self.entries.of(tenant)
        tasks = [task for e in entries for task in self._remove(e, "purge")]
        tasks += [e.writing for e in entries if e.writing is not None]
        foreign = self.disk.drop_foreign(lambda f: f.meta.tenant == tenant)
        await asyncio.gather(*tasks, *foreign, return_exceptions=True)
        return len(entries) + len(foreign)

    async def switch(self, fingerprint: str, layout: KVLayout | None = None) -> None:
        """Another model was loaded: this model's entries go to disk and are kept under their
        fingerprint (served again if it returns); the new model's files become servable."""
        await self.disk.flush(list(self.entries.values()))
        ours = self.disk.switch(fingerprint, layout, list(self.entries.values()))
        for entry in list(self.entries.values()):
            self._remove(entry, "model_swap")
        for entry in ours:
            self._index(entry)
        self._update_gauges()

    def expire(self) -> None:
        """Delete entries (and other models' files) unused for longer than the TTL."""
        cutoff = self.clock() - self.limits.ttl
        while (oldest := self.entries.oldest()) is not None and oldest.last_use < cutoff:
            self._remove(oldest, "ttl")
        self.disk.expire(cutoff)

    # Internals -------------------------------------------------------------------------------

    def _pick(self, keys, now: float) -> Entry | None:
        """Among entries sharing the same prefix: a resident one, then the most recently used
        (None if all those looked at are passed over after a read error)."""
        best = None
        for i, key in enumerate(keys):
            entry = self.entries[key]
            if entry.retry_at <= now and (best is None or preferred(entry, best)):
                best = entry
            if i >= 32:
                break
        return best

    def _index(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        self.catalog.add(entry)

    def _remove(self, entry: Entry, reason: str) -> list[asyncio.Task]:
        """Forget the entry (`reason` says why, for readers); returns the file removals it started."""
        if entry.removed:
            return []
        entry.removed = True
        del self.entries[entry.key]
        self.catalog.discard(entry)
        if entry.data is not None:
            del self.resident[entry.key]
            entry.data = None
        self._update_gauges()
        return self.disk.forget(entry)

    def _attach(self, entry: Entry, data: KVData) -> None:
        entry.data = data
        entry.last_use = self.clock()  # about to be used: never the next to spill
        self.resident[entry.key] = entry
        self._enforce_memory(entry.tenant, keep=entry)
        self._update_gauges()

    def _enforce_memory(self, tenant: str, keep: Entry | None = None, newcomer: Entry | None = None) -> None:
        """Spill least recently used entries past `tenant`'s share (its own), then past the budget;
        background and anonymous ones first. A background `newcomer` may push out only those (itself
        last, being the most recent)."""
        share = self.limits.share(self.limits.memory_budget)
        for scope, budget in ((tenant, share), (None, self.limits.memory_budget)):
            while budget is not None and self.resident.bytes_of(scope) > budget:
                victim = self.resident.oldest(scope, skip=keep)
                if victim is None or (newcomer is not None and victim.named and not victim.background):
                    break
                self._spill(victim, "budget")

    def _spill(self, entry: Entry, reason: str) -> None:
        data, entry.data = entry.data, None
        del self.resident[entry.key]
        self.metrics.cache_evictions.labels("memory", reason).inc()
        if not self.disk.spill(entry, data):  # no disk tier, or writes paused after a failure: gone
            self._remove(entry, reason)
        self._update_gauges()

    # Introspection ---------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        """Set the memory gauges now (after every change, so a scrape never computes them)."""
        self.metrics.cache_bytes.labels("memory").set(self.resident.bytes)
        self.metrics.cache_entries.labels("memory").set(len(self.resident))

    def check_integrity(self) -> None:
        """Assert the accounting and index invariants (tests call this after every operation)."""
        live = list(self.entries.values())
        self.entries.check()
        self.resident.check(self.limits.memory_budget, self.limits.share(self.limits.memory_budget))
        assert set(self.resident) == {e.key for e in live if e.data is not None}, "resident entries out of step"
        assert not any(e.data is not None and e.pending is not None for e in live)
        self.catalog.check(live)
        self.disk.stored.check()
        self.disk.foreign.check()
        self.disk.check_integrity(live)
