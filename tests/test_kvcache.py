"""The agent cache (cache/index.py and its disk tier): lookup, storing, budgets, expiry, restart and corruption, on a real directory."""

from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import replace
import threading
import time

import numpy as np
import pytest

from semcache.cache import access, cachedir, iothread, reader
from semcache.cache import entryfile as store
from semcache.cache.cachedir import CacheDirLocked
from semcache.cache.index import ANON, MISS, AgentCache, CacheLimits, common_prefix
from semcache.cache.kvdata import KVData
from semcache.cache.layout import KVLayout
from semcache.ops.config import Config
from tests.conftest import FAKE_LAYOUT, fake_kv, rewrite_header

T, OTHER = "tenant-a", "tenant-b"
ENTRY_TOKENS = 100
ENTRY_BYTES = 8 * ENTRY_TOKENS  # fake_kv: keys and values of float32, one per token
LIMITS = CacheLimits(memory_budget=1 << 20, disk_budget=1 << 20, ttl=1000.0, min_prefix=4)


class Clock:
    """A fake clock: time moves only when a test says so. Starts in the future so file mtimes
    (real time) never look newer than the metadata's last_use."""

    def __init__(self, now: float = 2e9):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


def seq(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def check(cache: AgentCache) -> None:
    cache.check_integrity()
    assert cache.memory_bytes <= cache.limits.memory_budget + ENTRY_BYTES


async def load(cache: AgentCache, entry) -> bool:
    """Make `entry` resident through fetch, as the scheduler does; False if it is gone or its file bad."""
    loading = cache.fetch(entry)
    return await loading if loading is not None else not entry.removed


def resident(match) -> bool:
    return match.entry is not None and (match.entry.data is not None or match.entry.pending is not None)


async def settle(cache: AgentCache) -> None:
    """Wait for the background file work (writes, removals, touches) to finish."""
    await cache.settle()
    check(cache)


def same_data(a: KVData, b: KVData) -> bool:
    return a.dtype == b.dtype and len(a.layers) == len(b.layers) and all(
        np.array_equal(x, y) and x.dtype == y.dtype for pa, pb in zip(a.layers, b.layers) for x, y in zip(pa, pb))


def files(directory, sub: str = "entries") -> set[str]:
    return {p.name for p in (directory / sub).iterdir()}


def flip_last_byte(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last layer's values: past the header and the token ids
    path.write_bytes(bytes(raw))


def samples(cache: AgentCache, name: str, **labels) -> float:
    return cache.metrics.registry.get_sample_value(name, labels or None) or 0.0


class Harness:
    """Opens AgentCaches on one tmp directory with one fake clock, and closes whatever is left open."""

    def __init__(self, directory):
        self.directory = directory
        self.clock = Clock()
        self.live: list[AgentCache] = []

    async def open(self, limits: CacheLimits = LIMITS, fingerprint: str = "fp-A", directory="default",
                   layout: KVLayout | None = None) -> AgentCache:
        cache = AgentCache(limits, self.directory if directory == "default" else directory, clock=self.clock)
        self.live.append(cache)
        await cache.lock()
        await cache.open(fingerprint, layout)
        check(cache)
        return cache

    async def close(self, cache: AgentCache) -> None:
        self.live.remove(cache)
        await cache.close()
        cache.check_integrity()

    async def reopen(self, cache: AgentCache, fingerprint: str = "fp-A", limits: CacheLimits | None = None,
                     layout: KVLayout | None = None):
        await self.close(cache)
        return await self.open(limits or cache.limits, fingerprint, layout=layout)


@pytest.fixture
async def h(tmp_path):
    harness = Harness(tmp_path / "cache")
    yield harness
    for cache in list(harness.live):
        await harness.close(cache)


def file_size(tmp_path, n: int, clock: Clock) -> int:
    """The size of one fake_kv entry file of n tokens (same metadata lengths as the cache writes)."""
    directory = tmp_path / "probe"
    (directory / "entries").mkdir(parents=True)
    tokens = np.asarray(seq(n), dtype=np.int32)
    meta = store.EntryMeta("0" * 16, "fp-A", T, "agent-1", True, n, "float32", "native", clock(), clock())
    return store.write(directory, meta, fake_kv(seq(n)).to_tensors(tokens)).size


class TestAgentCache:
    # Lookup -----------------------------------------------------------------------------------

    async def test_put_then_lookup_by_same_agent(self, h):
        """the agent's own entry is found; reuse = min(common prefix, len(prompt) - 1)."""
        cache = await h.open()
        entry = cache.put(T, "agent-1", seq(10), fake_kv(seq(10)))
        check(cache)
        assert entry is not None and entry.tier == "memory" and entry.named and entry.agent == "agent-1"
        same = cache.lookup(T, "agent-1", seq(10))
        assert same.entry is entry and same.num_tokens == 9  # one token is left to compute
        longer = cache.lookup(T, "agent-1", seq(15))
        assert longer.entry is entry and longer.num_tokens == 10
        shorter = cache.lookup(T, "agent-1", seq(6))
        assert shorter.entry is entry and shorter.num_tokens == 5
        hit = entry.data.prefix(longer.num_tokens)
        assert hit.layers[0][1][0, 0, :, 0].astype(int).tolist() == seq(10)
        assert resident(longer)
        check(cache)

    async def test_diverging_prompt_is_trimmed_to_the_common_prefix(self, h):
        """a prompt that leaves the stored tokens reuses only the shared part."""
        cache = await h.open()
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        prompt = seq(7) + [1, 2, 3, 4, 5]
        match = cache.lookup(T, "agent-1", prompt)
        assert match.entry is entry and match.num_tokens == 7
        assert cache.lookup(T, None, prompt).num_tokens == 7  # through the trie alike
        check(cache)

    async def test_below_min_prefix_is_a_miss(self, h):
        """fewer than min_prefix reusable tokens (or a prompt too short) is a miss."""
        cache = await h.open()
        cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        assert cache.lookup(T, "agent-1", seq(3) + [1, 2, 3]) is MISS  # 3 shared < 4
        assert cache.lookup(T, "agent-1", seq(4)) is MISS  # only 3 usable: the last is computed
        assert cache.lookup(T, "agent-1", seq(4) + [7]).num_tokens == 4
        assert cache.lookup(T, "agent-1", []) is MISS
        check(cache)

    async def test_other_tenant_never_hits(self, h):
        """same agent id and tokens under another tenant: no hit, and no entries listed."""
        cache = await h.open()
        cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        cache.put(T, None, seq(20, start=5000), fake_kv(seq(20, start=5000)))
        assert cache.lookup(OTHER, "agent-1", seq(20)) is MISS
        assert cache.lookup(OTHER, None, seq(20)) is MISS
        assert cache.lookup(OTHER, None, seq(20, start=5000)) is MISS
        assert cache.agents(OTHER) == [] and cache.agents(OTHER, "agent-1") == []
        assert len(cache.agents(T)) == 2
        check(cache)

    async def test_anonymous_entries_found_through_the_trie(self, h):
        """an anonymous entry serves another anonymous request (and a named agent) of the same tenant."""
        cache = await h.open()
        entry = cache.put(T, None, seq(30), fake_kv(seq(30)))
        assert not entry.named and entry.agent.startswith(ANON)
        match = cache.lookup(T, None, seq(30) + [1, 2])
        assert match.entry is entry and match.num_tokens == 30
        assert cache.lookup(T, "agent-9", seq(25)).entry is entry
        assert cache.agents(T, entry.agent) == [entry]  # listed under its anon- id
        check(cache)

    async def test_own_entry_wins_a_tie(self, h):
        """with equal prefixes, the agent's own entry beats a more recent one of another agent."""
        cache = await h.open()
        mine = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        h.clock.tick()
        theirs = cache.put(T, "agent-2", seq(20), fake_kv(seq(20)))
        assert cache.lookup(T, "agent-1", seq(25)).entry is mine
        assert cache.lookup(T, "agent-2", seq(25)).entry is theirs
        assert cache.lookup(T, None, seq(25)).entry is theirs  # anonymous: the most recent
        check(cache)

    async def test_longest_prefix_wins_over_own_entry(self, h):
        """another entry of the tenant sharing strictly more tokens beats the agent's own."""
        cache = await h.open()
        mine = cache.put(T, "agent-1", seq(10), fake_kv(seq(10)))
        theirs = cache.put(T, "agent-2", seq(30), fake_kv(seq(30)))
        match = cache.lookup(T, "agent-1", seq(40))
        assert match.entry is theirs and match.num_tokens == 30
        assert mine in cache.agents(T, "agent-1")
        check(cache)

    async def test_record_counts_results(self, h):
        """record counts memory hits, partial (diverged) hits, disk hits and misses, and reused tokens."""
        cache = await h.open()
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        h.clock.tick(5)
        cache.record(cache.lookup(T, "agent-1", seq(25)), 25, from_disk=False)
        assert entry.last_use == h.clock.now
        cache.record(cache.lookup(T, "agent-1", seq(10)), 10, from_disk=False)  # whole prompt but its last
        cache.record(cache.lookup(T, "agent-1", seq(8) + [1, 2]), 10, from_disk=False)
        cache.record(cache.lookup(T, "agent-1", seq(25)), 25, from_disk=True)
        cache.record(MISS, 25, from_disk=False)
        lookups = "semcache_cache_lookups_total"
        assert samples(cache, lookups, result="memory_hit") == 2
        assert samples(cache, lookups, result="partial") == 1
        assert samples(cache, lookups, result="disk_hit") == 1
        assert samples(cache, lookups, result="miss") == 1
        assert samples(cache, "semcache_cache_tokens_reused_total") == 20 + 9 + 8 + 20
        await settle(cache)

    async def test_record_touches_the_file(self, h):
        """a recorded hit on an entry with a file sets the file's mtime to the use time."""
        cache = await h.open()
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await settle(cache)
        h.clock.tick(100)
        cache.record(cache.lookup(T, "agent-1", seq(25)), 25, from_disk=False)
        await settle(cache)
        assert os.stat(entry.path).st_mtime == pytest.approx(h.clock.now)

    # Storing ---------------------------------------------------------------------------------

    async def test_longer_put_replaces_the_entry_it_extends(self, h):
        """the same agent storing a continuation leaves one entry; the old file is deleted."""
        cache = await h.open()
        old = cache.put(T, "agent-1", seq(10), fake_kv(seq(10)))
        await settle(cache)
        old_file = old.path.name
        new = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        check(cache)
        assert cache.agents(T, "agent-1") == [new] and old.removed
        assert cache.lookup(T, "agent-1", seq(10)).entry is new
        await settle(cache)
        assert files(h.directory) == {new.path.name} and old_file not in files(h.directory)
        assert cache.memory_bytes == new.data.nbytes

    async def test_replaced_file_outlives_the_write_of_its_successor(self, h, monkeypatch):
        """while the continuation's file is being written, the previous turn's file stays on disk (a
        crash then still leaves the agent its previous turn); it goes once the new one is written."""
        import threading

        cache = await h.open()
        old = cache.put(T, "agent-1", seq(10), fake_kv(seq(10)))
        await settle(cache)
        old_file = old.path.name
        release = threading.Event()
        real_write = store.write

        def slow_write(*args):
            release.wait(5)
            return real_write(*args)

        monkeypatch.setattr(store, "write", slow_write)
        new = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        check(cache)
        await asyncio.sleep(0.05)
        assert files(h.directory) == {old_file}, "the old file went before the new one was written"
        release.set()
        await settle(cache)
        assert files(h.directory) == {new.path.name}

    async def test_put_of_a_covered_prefix_keeps_the_existing_entry(self, h):
        """storing a prefix of what the agent already has returns the existing entry, marked used."""
        cache = await h.open()
        long = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        h.clock.tick(3)
        assert cache.put(T, "agent-1", seq(10), fake_kv(seq(10))) is long
        assert long.last_use == h.clock.now and len(cache.entries) == 1
        check(cache)

    async def test_put_keeps_other_agents_and_branches(self, h):
        """a continuation replaces only its own agent's entry; a diverging branch is kept."""
        cache = await h.open()
        other = cache.put(T, "agent-2", seq(10), fake_kv(seq(10)))
        branch = cache.put(T, "agent-1", seq(10) + [1, 2], fake_kv(seq(10) + [1, 2]))
        new = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        check(cache)
        assert set(cache.agents(T, "agent-1")) == {branch, new}
        assert cache.agents(T, "agent-2") == [other]

    async def test_put_uses_only_the_tokens_the_kv_covers(self, h):
        """token ids past the KV's length (the last sampled token) are not stored."""
        cache = await h.open()
        entry = cache.put(T, "agent-1", seq(12), fake_kv(seq(10)))
        assert entry.num_tokens == 10 and entry.tokens.tolist() == seq(10)
        check(cache)

    async def test_entries_shorter_than_min_prefix_are_not_stored(self, h):
        """fewer tokens than min_prefix could never be hit: put returns None, nothing is written;
        exactly min_prefix tokens is stored and hit."""
        cache = await h.open()
        assert cache.put(T, "agent-1", seq(3), fake_kv(seq(3))) is None
        assert cache.put(T, None, seq(3, 5000), fake_kv(seq(3, 5000))) is None
        await settle(cache)
        assert cache.entries == {} and files(h.directory) == set() and cache.memory_bytes == 0
        entry = cache.put(T, "agent-1", seq(4), fake_kv(seq(4)))
        assert entry is not None and cache.lookup(T, "agent-1", seq(6)).num_tokens == 4
        await settle(cache)
        assert files(h.directory) == {entry.path.name}

    # Memory budget ---------------------------------------------------------------------------

    async def test_memory_budget_spills_least_recently_used(self, h):
        """with room for ~2 entries, 4 puts leave the 2 most recent in memory and spill the rest to disk."""
        limits = CacheLimits(memory_budget=int(2.5 * ENTRY_BYTES), ttl=1000.0, min_prefix=4)
        cache = await h.open(limits)
        entries = []
        for i in range(4):
            h.clock.tick()
            entries.append(cache.put(T, f"agent-{i}", seq(ENTRY_TOKENS, 1000 * (i + 1)),
                                     fake_kv(seq(ENTRY_TOKENS, 1000 * (i + 1)))))
            check(cache)
        assert [e.tier for e in entries] == ["disk", "disk", "memory", "memory"]
        assert cache.memory_bytes == 2 * ENTRY_BYTES <= limits.memory_budget
        await settle(cache)
        assert files(h.directory) == {e.path.name for e in entries}
        assert samples(cache, "semcache_cache_evictions_total", tier="memory", reason="budget") == 2
        # a spilled entry is still found, though not resident
        match = cache.lookup(T, "agent-0", seq(ENTRY_TOKENS, 1000))
        assert match.entry is entries[0] and not resident(match)

    async def test_use_order_decides_what_spills(self, h):
        """a recently used (recorded) entry survives; the least recently used one spills."""
        limits = CacheLimits(memory_budget=int(2.5 * ENTRY_BYTES), ttl=1000.0, min_prefix=4)
        cache = await h.open(limits)
        a = cache.put(T, "agent-a", seq(ENTRY_TOKENS, 1000), fake_kv(seq(ENTRY_TOKENS, 1000)))
        h.clock.tick()
        b = cache.put(T, "agent-b", seq(ENTRY_TOKENS, 2000), fake_kv(seq(ENTRY_TOKENS, 2000)))
        h.clock.tick()
        cache.record(cache.lookup(T, "agent-a", seq(ENTRY_TOKENS, 1000)), ENTRY_TOKENS, from_disk=False)
        h.clock.tick()
        c = cache.put(T, "agent-c", seq(ENTRY_TOKENS, 3000), fake_kv(seq(ENTRY_TOKENS, 3000)))
        check(cache)
        assert (a.tier, b.tier, c.tier) == ("memory", "disk", "memory")
        await settle(cache)

    async def test_named_entries_outlive_anonymous_ones(self, h):
        """anonymous entries spill first, even when more recent than named ones."""
        limits = CacheLimits(memory_budget=int(2.5 * ENTRY_BYTES), ttl=1000.0, min_prefix=4)
        cache = await h.open(limits)
        made = []
        for i, agent in enumerate(["named-1", None, None, "named-2"]):
            h.clock.tick()
            tokens = seq(ENTRY_TOKENS, 1000 * (i + 1))
            made.append(cache.put(T, agent, tokens, fake_kv(tokens)))
            check(cache)
        assert [e.tier for e in made] == ["memory", "disk", "disk", "memory"]
        await settle(cache)

    async def test_spilled_entry_loads_back_identical(self, h):
        """fetch reads a spilled entry's file back: resident again, arrays equal the original."""
        limits = CacheLimits(memory_budget=int(2.5 * ENTRY_BYTES), ttl=1000.0, min_prefix=4)
        cache = await h.open(limits)
        originals, entries = [], []
        for i in range(4):
            h.clock.tick()
            tokens = seq(ENTRY_TOKENS, 1000 * (i + 1))
            originals.append(fake_kv(tokens))
            entries.append(cache.put(T, f"agent-{i}", tokens, originals[-1]))
        await settle(cache)
        first = cache.lookup(T, "agent-0", seq(ENTRY_TOKENS, 1000) + [7]).entry
        assert first is entries[0] and first.tier == "disk"
        assert await load(cache, first)
        check(cache)
        assert first.tier == "memory" and same_data(first.data, originals[0])
        assert entries[2].tier == "disk"  # the least recently used resident one made room
        assert await load(cache, first)  # already resident: True at once
        await settle(cache)

    async def test_fetch_takes_back_an_entry_still_being_written(self, h):
        """a spilled entry whose file is not written yet is made resident again without reading."""
        limits = CacheLimits(memory_budget=int(1.5 * ENTRY_BYTES), ttl=1000.0, min_prefix=4, write_through=False)
        cache = await h.open(limits)
        a = cache.put(T, "agent-a", seq(ENTRY_TOKENS, 1000), fake_kv(seq(ENTRY_TOKENS, 1000)))
        h.clock.tick()
        b = cache.put(T, "agent-b", seq(ENTRY_TOKENS, 2000), fake_kv(seq(ENTRY_TOKENS, 2000)))
        check(cache)
        assert a.pending is not None and cache.writing_bytes == ENTRY_BYTES
        assert resident(cache.lookup(T, "agent-a", seq(ENTRY_TOKENS, 1000)))
        assert cache.fetch(a) is None
        check(cache)
        assert a.tier == "memory" and a.pending is None
        assert b.pending is not None and cache.writing_bytes == ENTRY_BYTES  # b made room for a
        assert same_data(a.data, fake_kv(seq(ENTRY_TOKENS, 1000)))
        await settle(cache)

    async def test_no_directory_drops_what_spills(self, h):
        """without a disk tier, entries past the memory budget are simply dropped."""
        limits = CacheLimits(memory_budget=int(1.5 * ENTRY_BYTES), ttl=1000.0, min_prefix=4)
        cache = await h.open(limits, directory=None)
        a = cache.put(T, "agent-a", seq(ENTRY_TOKENS, 1000), fake_kv(seq(ENTRY_TOKENS, 1000)))
        h.clock.tick()
        b = cache.put(T, "agent-b", seq(ENTRY_TOKENS, 2000), fake_kv(seq(ENTRY_TOKENS, 2000)))
        check(cache)
        assert a.removed and list(cache.entries.values()) == [b]
        assert cache.lookup(T, "agent-a", seq(ENTRY_TOKENS, 1000)) is MISS

    # Disk budget, expiry, management ---------------------------------------------------------

    async def test_disk_budget_deletes_oldest_files(self, h, tmp_path):
        """past the disk budget the oldest files are deleted (entries only on disk go with them)."""
        size = file_size(tmp_path, ENTRY_TOKENS, h.clock)
        limits = CacheLimits(memory_budget=0, disk_budget=int(2.5 * size), ttl=1000.0, min_prefix=4)
        cache = await h.open(limits)
        entries = []
        for i in range(4):
            h.clock.tick()
            tokens = seq(ENTRY_TOKENS, 1000 * (i + 1))
            entries.append(cache.put(T, f"agent-{i}", tokens, fake_kv(tokens)))
            await settle(cache)
            assert cache.disk_bytes <= limits.disk_budget
        assert [e.removed for e in entries] == [True, True, False, False]
        assert files(h.directory) == {e.path.name for e in entries[2:]}
        assert cache.disk_bytes == sum(e.file_bytes for e in entries[2:]) == 2 * size
        assert cache.lookup(T, "agent-0", seq(ENTRY_TOKENS, 1000)) is MISS
        assert samples(cache, "semcache_cache_evictions_total", tier="disk", reason="budget") == 2

    async def test_disk_budget_keeps_resident_entries_in_memory(self, h, tmp_path):
        """a resident entry whose file is deleted for the disk budget stays served from memory."""
        size = file_size(tmp_path, ENTRY_TOKENS, h.clock)
        limits = CacheLimits(memory_budget=1 << 20, disk_budget=int(1.5 * size), ttl=1000.0, min_prefix=4)
        cache = await h.open(limits)
        a = cache.put(T, "agent-a", seq(ENTRY_TOKENS, 1000), fake_kv(seq(ENTRY_TOKENS, 1000)))
        await settle(cache)
        h.clock.tick()
        b = cache.put(T, "agent-b", seq(ENTRY_TOKENS, 2000), fake_kv(seq(ENTRY_TOKENS, 2000)))
        await settle(cache)
        assert a.path is None and a.dirty and a.tier == "memory" and not a.removed
        assert files(h.directory) == {b.path.name}
        assert cache.lookup(T, "agent-a", seq(ENTRY_TOKENS, 1000)).entry is a

    async def test_expire_deletes_entries_past_the_ttl(self, h):
        """expire() removes entries unused for longer than ttl, with their files; used ones stay."""
        cache = await h.open()
        old = cache.put(T, "agent-old", seq(20, 1000), fake_kv(seq(20, 1000)))
        used = cache.put(T, "agent-used", seq(20, 2000), fake_kv(seq(20, 2000)))
        await settle(cache)
        old_file = old.path.name
        h.clock.tick(600)
        cache.record(cache.lookup(T, "agent-used", seq(20, 2000)), 20, from_disk=False)
        fresh = cache.put(T, "agent-fresh", seq(20, 3000), fake_kv(seq(20, 3000)))
        cache.expire()
        check(cache)
        assert len(cache.entries) == 3  # nothing is past the ttl yet
        h.clock.tick(500)  # old: 1100 s unused; used and fresh: 500 s
        cache.expire()
        check(cache)
        assert old.removed and set(cache.entries.values()) == {used, fresh}
        assert cache.lookup(T, "agent-old", seq(20, 1000)) is MISS
        await settle(cache)
        assert old_file not in files(h.directory) and len(files(h.directory)) == 2

    async def test_delete_removes_memory_and_files(self, h):
        """delete() removes all of an agent's entries from memory and disk and returns their count."""
        cache = await h.open()
        a1 = cache.put(T, "agent-1", seq(20, 1000), fake_kv(seq(20, 1000)))
        a2 = cache.put(T, "agent-1", seq(20, 2000), fake_kv(seq(20, 2000)))
        other = cache.put(T, "agent-2", seq(20, 3000), fake_kv(seq(20, 3000)))
        await settle(cache)
        paths = [a1.path, a2.path]
        assert await cache.delete(T, "agent-1") == 2
        check(cache)
        assert cache.agents(T, "agent-1") == [] and cache.agents(T) == [other]
        assert not any(p.exists() for p in paths) and other.path.exists()
        assert cache.memory_bytes == other.data.nbytes and cache.disk_bytes == other.file_bytes
        assert await cache.delete(T, "agent-1") == 0

    async def test_delete_while_writing(self, h):
        """an entry deleted while its file is being written leaves no file behind."""
        cache = await h.open()
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        assert entry.writing is not None
        assert await cache.delete(T, "agent-1") == 1
        await settle(cache)
        assert files(h.directory) == set() and cache.disk_bytes == 0

    async def test_evict_moves_entries_to_disk(self, h):
        """evict() spills an agent's entries; when it returns their files exist, and they load back."""
        cache = await h.open(CacheLimits(ttl=1000.0, min_prefix=4, write_through=False))
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        keep = cache.put(T, "agent-2", seq(20, 5000), fake_kv(seq(20, 5000)))
        assert entry.path is None  # write_through off: nothing written yet
        evicted = await cache.evict(T, "agent-1")
        check(cache)
        assert evicted == [entry] and entry.tier == "disk" and entry.path.exists()
        assert keep.tier == "memory" and cache.memory_bytes == keep.data.nbytes
        assert samples(cache, "semcache_cache_evictions_total", tier="memory", reason="request") == 1
        assert await load(cache, entry)
        check(cache)
        assert same_data(entry.data, fake_kv(seq(20)))
        await settle(cache)

    async def test_no_empty_pool_or_trie_is_kept(self, h):
        """an agent (or tenant) whose entries are all gone leaves no empty set or trie behind, however
        they went: delete, expire, evict without a disk tier, replacement."""
        cache = await h.open()
        cache.put(T, "agent-1", seq(20, 1000), fake_kv(seq(20, 1000)))
        cache.put(OTHER, "agent-2", seq(20, 2000), fake_kv(seq(20, 2000)))
        anon = cache.put(T, None, seq(20, 3000), fake_kv(seq(20, 3000)))
        cache.put(T, None, seq(30, 3000), fake_kv(seq(30, 3000)))  # replaces the anonymous one
        assert anon.removed and (T, anon.agent) not in cache.catalog.pools
        await cache.delete(T, "agent-1")
        assert (T, "agent-1") not in cache.catalog.pools
        h.clock.tick(LIMITS.ttl + 1)
        cache.expire()
        check(cache)
        assert cache.entries == {} and cache.catalog.pools == {}
        assert cache.catalog.tries == {} and cache.catalog.anonymous == {} and cache.entries.tenants() == []
        memory_only = await h.open(directory=None)
        memory_only.put(T, "agent-3", seq(20), fake_kv(seq(20)))
        await memory_only.evict(T, "agent-3")  # no disk tier: the entry is dropped
        check(memory_only)
        assert memory_only.entries == {} and memory_only.catalog.pools == {} and memory_only.catalog.tries == {}
        await settle(cache)

    # Restart ---------------------------------------------------------------------------------

    async def test_restart_indexes_entries_on_disk(self, h):
        """a new cache on the same directory and fingerprint finds the entries (tier disk) and loads them."""
        cache = await h.open()
        originals = {f"agent-{i}": fake_kv(seq(20, 1000 * (i + 1))) for i in range(2)}
        for i, (agent, data) in enumerate(originals.items()):
            cache.put(T, agent, seq(20, 1000 * (i + 1)), data)
        anon = cache.put(T, None, seq(20, 9000), fake_kv(seq(20, 9000)))
        cache = await h.reopen(cache)
        assert len(cache.entries) == 3 and all(e.tier == "disk" for e in cache.entries.values())
        assert cache.memory_bytes == 0 and cache.disk_bytes == sum(e.file_bytes for e in cache.entries.values())
        for i, (agent, data) in enumerate(originals.items()):
            match = cache.lookup(T, agent, seq(25, 1000 * (i + 1)))
            assert match.num_tokens == 20 and match.entry.agent == agent and match.entry.named
            assert await load(cache, match.entry)
            check(cache)
            assert same_data(match.entry.data, data)
        again = cache.lookup(T, None, seq(21, 9000)).entry
        assert again.key == anon.key and again.agent == anon.agent and not again.named
        assert cache.lookup(OTHER, "agent-0", seq(25, 1000)) is MISS

    async def test_directory_is_locked_while_open(self, h):
        """a second cache cannot take a directory in use; after close it can."""
        cache = await h.open()
        second = AgentCache(LIMITS, h.directory, clock=h.clock)
        with pytest.raises(CacheDirLocked):
            await second.lock()
        await second.close()
        await h.close(cache)
        await h.open()

    async def test_other_fingerprint_counts_files_as_foreign(self, h):
        """another model's files are never served, are counted in foreign and disk_bytes, and stay."""
        cache = await h.open()
        cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        cache.put(T, "agent-2", seq(20, 5000), fake_kv(seq(20, 5000)))
        cache = await h.reopen(cache, "fp-B")
        assert cache.lookup(T, "agent-1", seq(25)) is MISS
        assert cache.entries == {} and len(cache.foreign) == 2
        assert cache.disk_bytes == sum(f.size for f in cache.foreign.values()) > 0
        assert samples(cache, "semcache_cache_entries", tier="disk") == 2
        cache = await h.reopen(cache, "fp-A")
        assert cache.foreign == {} and len(cache.entries) == 2
        match = cache.lookup(T, "agent-1", seq(25))
        assert match.num_tokens == 20 and await load(cache, match.entry)
        check(cache)

    async def test_foreign_files_go_first_past_the_disk_budget(self, h, tmp_path):
        """older files of another model are deleted before this model's newer ones."""
        size = file_size(tmp_path, 20, h.clock)
        limits = CacheLimits(disk_budget=int(2.5 * size), ttl=1000.0, min_prefix=4)
        cache = await h.open(limits)
        cache.put(T, "agent-1", seq(20, 1000), fake_kv(seq(20, 1000)))
        cache.put(T, "agent-2", seq(20, 2000), fake_kv(seq(20, 2000)))
        cache = await h.reopen(cache, "fp-B")
        h.clock.tick()
        mine = cache.put(T, "agent-3", seq(20, 3000), fake_kv(seq(20, 3000)))
        await settle(cache)
        assert len(cache.foreign) == 1 and mine.path.exists()
        assert len(files(h.directory)) == 2 and cache.disk_bytes <= limits.disk_budget

    async def test_open_expires_stale_files(self, h):
        """files unused for longer than the ttl are deleted when the cache opens."""
        cache = await h.open()
        cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await h.close(cache)
        h.clock.tick(LIMITS.ttl + 1)
        cache = await h.open()
        assert cache.entries == {}
        await settle(cache)
        assert files(h.directory) == set() and cache.disk_bytes == 0

    # Corruption ------------------------------------------------------------------------------

    async def test_corrupt_file_is_quarantined_on_load(self, h):
        """a flipped data byte: the reopened index still hits, but load() is False, the file is moved
        to quarantine/, the entry is gone and the quarantine counter went up."""
        cache = await h.open()
        cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await settle(cache)
        name = cache.agents(T, "agent-1")[0].path.name
        await h.close(cache)
        flip_last_byte(h.directory / "entries" / name)
        cache = await h.open()
        match = cache.lookup(T, "agent-1", seq(25))
        assert match.num_tokens == 20 and match.entry.tier == "disk"
        before = samples(cache, "semcache_cache_quarantined_total")
        assert await load(cache, match.entry) is False
        check(cache)
        assert match.entry.removed and cache.entries == {} and cache.disk_bytes == 0
        assert cache.lookup(T, "agent-1", seq(25)) is MISS
        assert files(h.directory) == set() and files(h.directory, "quarantine") == {name}
        assert samples(cache, "semcache_cache_quarantined_total") == before + 1

    async def test_unreadable_file_is_quarantined_on_open(self, h):
        """a file whose header does not parse is quarantined when the cache opens; the rest load."""
        cache = await h.open()
        good = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await h.close(cache)
        (h.directory / "entries" / "deadbeef.safetensors").write_bytes(b"\x10" * 5)
        (h.directory / "entries" / f".{good.key}.tmp").write_bytes(b"torn")
        cache = await h.open()
        await settle(cache)
        assert samples(cache, "semcache_cache_quarantined_total") == 1
        assert files(h.directory, "quarantine") == {"deadbeef.safetensors"}
        assert files(h.directory) == {good.path.name}  # the temp file is gone too
        assert list(cache.entries) == [good.key]

    async def test_file_of_another_entry_is_refused(self, h):
        """a file whose metadata does not match the index (swapped under the name) is quarantined."""
        cache = await h.open()
        a = cache.put(T, "agent-a", seq(20, 1000), fake_kv(seq(20, 1000)))
        b = cache.put(T, "agent-b", seq(20, 2000), fake_kv(seq(20, 2000)))
        await h.close(cache)
        cache = await h.open()
        entry = cache.entries[a.key]
        os.replace(b.path, a.path)
        assert await load(cache, entry) is False
        check(cache)
        assert a.path.name in files(h.directory, "quarantine")

    async def test_failed_write_drops_a_spilled_entry(self, h, monkeypatch):
        """an OSError writing a spilled entry's file drops the entry and keeps the accounting right."""
        def broken(*args):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(store, "write", broken)
        cache = await h.open(CacheLimits(memory_budget=0, ttl=1000.0, min_prefix=4))
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        check(cache)
        await settle(cache)
        assert entry.removed and cache.entries == {} and cache.writing_bytes == 0

    # Close -----------------------------------------------------------------------------------

    async def test_close_writes_dirty_entries(self, h):
        """with write_through off, close() writes memory entries so a restart finds them."""
        limits = CacheLimits(ttl=1000.0, min_prefix=4, write_through=False)
        cache = await h.open(limits)
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await settle(cache)
        assert entry.dirty and files(h.directory) == set()
        cache = await h.reopen(cache)
        assert [e.key for e in cache.entries.values()] == [entry.key]
        restored = cache.entries[entry.key]
        assert restored.tier == "disk" and await load(cache, restored)
        assert same_data(restored.data, fake_kv(seq(20)))
        check(cache)


class TestRaces:
    """Entries removed while their file is read, and files that cannot be quantized: no stuck
    entry, no drifted accounting."""

    async def test_load_of_an_entry_removed_before_its_read_starts(self, h):
        """an entry removed (delete/expire/put/disk budget) between fetch and its read: load is False."""
        cache = await h.open()
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await cache.evict(T, "agent-1")
        loading = cache.fetch(entry)
        await cache.delete(T, "agent-1")
        assert await loading is False
        check(cache)

    async def test_corrupt_read_of_an_entry_removed_meanwhile(self, h):
        """a corrupt file read while its entry expires: load is False and the accounting holds."""
        cache = await h.open()
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await cache.evict(T, "agent-1")
        flip_last_byte(entry.path)
        loading = cache.fetch(entry)
        await asyncio.sleep(0)  # the read is on the I/O thread now
        h.clock.tick(LIMITS.ttl + 1)
        cache.expire()
        assert await loading is False
        check(cache)

    async def test_write_of_an_entry_replaced_before_it_started(self, h, monkeypatch):
        """a continuation put before the previous turn's write task ran: that task finds its entry
        gone and ends quietly (it raised AttributeError, leaving the entry's `writing` set)."""
        cache = await h.open()
        spawned = []
        spawn = cache.disk.io.spawn
        monkeypatch.setattr(cache.disk.io, "spawn", lambda aw: spawned.append(spawn(aw)) or spawned[-1])
        old = cache.put(T, "agent-1", seq(10), fake_kv(seq(10)))
        new = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))  # before the loop ran old's task
        assert old.removed and old.writing is not None and not old.writing.done()
        await settle(cache)
        assert len(spawned) >= 2 and all(t.exception() is None for t in spawned)
        assert old.writing is None and old.path is None
        assert files(h.directory) == {new.path.name}

    async def test_quantized_spill_with_head_dim_80(self, h):
        """int8 encoding with head_dim 80 (e.g. phi-2): the spilled entry is written or dropped, never stuck."""
        cache = await h.open(CacheLimits(memory_budget=0, ttl=1000.0, min_prefix=4, encoding="int8"))
        a = np.ones((1, 2, 20, 80), np.float32)
        entry = cache.put(T, "agent-1", seq(20), KVData(((a, a.copy()),), "float32"))
        await settle(cache)
        assert entry.path is not None, "entry stuck in the writing tier"
        assert store.read_meta(entry.path).meta.encoding == "native"  # head_dim 80 is not in groups of 32
        assert cache.writing_bytes == 0


def planted(directory, key: str, tokens: list[int], heads: int = 1, head_dim: int = 1, layers: int = 1,
            dtype: str = "float32", array_dtype: str | None = None, agent: str = "agent-1"):
    """An entry file of fingerprint fp-A written by the cache's own writer (valid hash) holding KV
    of the given shape: only a check against the model's KV layout can refuse it."""
    shape = (1, heads, len(tokens), head_dim)
    data = KVData(tuple((np.zeros(shape, array_dtype or dtype), np.zeros(shape, array_dtype or dtype))
                        for _ in range(layers)), dtype)
    meta = store.EntryMeta(key, "fp-A", T, agent, True, len(tokens), dtype, "native", 1000.0, 1000.0)
    return store.write(directory, meta, data.to_tensors(np.asarray(tokens, np.int32)))


PLANTED_SHAPES = {"kv-heads": dict(heads=2), "head-dim": dict(head_dim=2), "layers": dict(layers=2),
                  "dtype": dict(dtype="float16"), "arrays-not-the-dtype": dict(array_dtype="uint8")}


class TestPlantedFiles:
    """Files built by the cache's own writer, then planted or damaged: each is quarantined (at start
    if its header shows it, else when loaded), start-up neither fails nor hangs, and the rest serve."""

    @pytest.mark.parametrize("field,value", [("tenant", ["t"]), ("key", 7), ("named", 1), ("num_tokens", 20),
                                             ("last_use", 2e9), ("agent", None)])
    async def test_a_non_string_header_field_is_quarantined_and_start_up_goes_on(self, h, field, value):
        """a header value that is not a string (the hash resealed) is refused at start, not a crash."""
        cache = await h.open()
        bad = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        good = cache.put(T, "agent-2", seq(20, 5000), fake_kv(seq(20, 5000)))
        await h.close(cache)
        rewrite_header(bad.path, lambda header: header["__metadata__"].__setitem__(field, value))
        cache = await h.open()
        await settle(cache)
        assert list(cache.entries) == [good.key] and files(h.directory, "quarantine") == {bad.path.name}
        assert await load(cache, cache.entries[good.key])

    @pytest.mark.parametrize("kind", ["fifo", "folder", "symlink"])
    async def test_anything_but_a_regular_file_in_entries_is_quarantined_without_a_hang(self, h, tmp_path, kind):
        """a FIFO (its open would block start-up for ever), a folder or a symlink named as an entry."""
        cache = await h.open()
        good = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await h.close(cache)
        path = h.directory / "entries" / ("ab" * 8 + store.SUFFIX)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "folder":
            path.mkdir()
        else:
            (tmp_path / "elsewhere" / "entries").mkdir(parents=True)
            path.symlink_to(planted(tmp_path / "elsewhere", "ab" * 8, seq(20, 7000)).path)
        try:
            cache = await asyncio.wait_for(h.open(), 5.0)
            await settle(cache)
        finally:
            _unblock(path)
        assert list(cache.entries) == [good.key] and files(h.directory, "quarantine") == {path.name}

    @pytest.mark.parametrize("shape", PLANTED_SHAPES)
    async def test_kv_not_of_the_models_layout_is_quarantined_at_start(self, h, shape):
        """a file of this model's fingerprint whose KV is not the model's (layer count, kv heads, head
        dim, dtype) is refused from its header when the cache opens: never handed to MLX."""
        cache = await h.open(layout=FAKE_LAYOUT)
        good = cache.put(T, "agent-2", seq(20, 5000), fake_kv(seq(20, 5000)))
        await h.close(cache)
        bad = planted(h.directory, "ab" * 8, seq(20), **PLANTED_SHAPES[shape])
        cache = await h.open(layout=FAKE_LAYOUT)
        await settle(cache)
        assert list(cache.entries) == [good.key] and files(h.directory, "quarantine") == {bad.path.name}
        assert cache.lookup(T, "agent-1", seq(25)) is MISS

    @pytest.mark.parametrize("shape", PLANTED_SHAPES)
    async def test_kv_not_of_the_models_layout_swapped_in_later_is_quarantined_at_load(self, h, shape):
        """the same file put in place of an indexed entry's (same key, tokens and fingerprint): the
        arrays read are checked before use, so the load is a miss and the file is quarantined."""
        cache = await h.open(layout=FAKE_LAYOUT)
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await cache.evict(T, "agent-1")
        name = entry.path.name
        planted(h.directory, entry.key, seq(20), **PLANTED_SHAPES[shape])
        assert await load(cache, entry) is False
        check(cache)
        assert entry.removed and files(h.directory, "quarantine") == {name}

    async def test_a_file_named_for_another_key_is_quarantined(self, h):
        """an entry file renamed (its header's key is not its name) is refused at start."""
        cache = await h.open()
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await h.close(cache)
        moved = entry.path.with_name("cd" * 8 + store.SUFFIX)
        os.replace(entry.path, moved)
        cache = await h.open()
        await settle(cache)
        assert cache.entries == {} and files(h.directory, "quarantine") == {moved.name}

    async def test_a_last_use_in_the_future_is_clamped_to_now(self, h):
        """a planted last use far in the future would pin the entry against expiry: it is now."""
        cache = await h.open()
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await h.close(cache)
        rewrite_header(entry.path, lambda header: header["__metadata__"].__setitem__("last_use", "1e12"))
        cache = await h.open()
        assert cache.entries[entry.key].last_use == h.clock()
        h.clock.tick(LIMITS.ttl + 1)
        cache.expire()
        await settle(cache)
        assert cache.entries == {} and files(h.directory) == set()

    @pytest.mark.parametrize("where", ["memory", "disk"])
    async def test_reject_quarantines_the_file_and_forgets_the_entry(self, h, where):
        """an entry the engine failed on (resident, from disk or not yet written) is dropped and its
        file, if any, moved to quarantine; the accounting holds."""
        cache = await h.open(CacheLimits(ttl=1000.0, min_prefix=4, write_through=where == "disk"))
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await settle(cache)
        name = entry.path.name if entry.path is not None else None
        await cache.disk.reject(entry)
        check(cache)
        assert entry.removed and cache.entries == {} and cache.lookup(T, "agent-1", seq(25)) is MISS
        assert files(h.directory) == set()
        assert files(h.directory, "quarantine") == ({name} if name else set())
        await cache.disk.reject(entry)  # twice: nothing more happens


def _unblock(path) -> None:
    """Open a FIFO for writing, so a reader blocked on it (in a thread of an unfixed build) wakes."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def enospc(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class TestDiskFullAtStart:
    """A full disk when the daemon starts: the entries on disk are indexed and served all the same,
    and writes start again, with backoff, once space returns. ENOSPC is simulated."""

    async def test_entries_are_indexed_when_the_lock_file_cannot_be_written(self, h, monkeypatch):
        """writing the pid into the lock file and every entry file fail with ENOSPC: the entries on
        disk are indexed and served, new ones live in memory; once space returns they are written."""
        cache = await h.open()
        old = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await h.close(cache)

        class Full:
            def __init__(self, f):
                self.f = f

            write = staticmethod(enospc)

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(cachedir, "open", lambda *a, **k: Full(open(*a, **k)), raising=False)
        monkeypatch.setattr(store, "write", enospc)
        cache = await h.open()
        cache.write_pause = 0.05
        assert list(cache.entries) == [old.key]
        assert await load(cache, cache.entries[old.key])
        new = cache.put(T, "agent-2", seq(20, 5000), fake_kv(seq(20, 5000)))
        await settle(cache)
        assert new.dirty and new.path is None and new.tier == "memory"
        assert samples(cache, "semcache_cache_disk_errors_total", op="write", errno="ENOSPC") == 1

        monkeypatch.undo()  # space returns
        await asyncio.sleep(0.06)
        newer = cache.put(T, "agent-3", seq(20, 9000), fake_kv(seq(20, 9000)))
        await settle(cache)
        assert new.path.exists() and newer.path.exists()

    async def test_writes_back_off_while_the_disk_stays_full(self, h, monkeypatch):
        """each failure in a row doubles the pause before writes are tried again; a success resets it."""
        attempts = []

        def full(directory, meta, tensors):
            attempts.append(meta.key)
            enospc()

        cache = await h.open()
        cache.write_pause = 0.3
        monkeypatch.setattr(store, "write", full)
        cache.put(T, "agent-1", seq(20, 1000), fake_kv(seq(20, 1000)))
        await settle(cache)
        assert len(attempts) == 1  # paused for 0.3 s
        await asyncio.sleep(0.35)
        cache.put(T, "agent-2", seq(20, 2000), fake_kv(seq(20, 2000)))
        await settle(cache)
        assert len(attempts) == 3  # agent-1 again, agent-2: both fail, paused for 0.6 s
        await asyncio.sleep(0.35)
        cache.put(T, "agent-3", seq(20, 3000), fake_kv(seq(20, 3000)))
        await settle(cache)
        assert len(attempts) == 3, "writes were tried again before the doubled pause was over"
        await asyncio.sleep(0.3)
        monkeypatch.undo()
        cache.put(T, "agent-4", seq(20, 4000), fake_kv(seq(20, 4000)))
        await settle(cache)
        assert all(e.path is not None for e in cache.entries.values()) and len(files(h.directory)) == 4

    async def test_a_directory_that_cannot_be_locked_is_read_only_until_it_can(self, h, monkeypatch):
        """the lock cannot be taken (ENOSPC creating it): the entries are indexed and served read-only,
        deletions and writes wait; the lock is retried and, once held, they happen."""
        cache = await h.open()
        kept = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        gone = cache.put(T, "agent-2", seq(20, 5000), fake_kv(seq(20, 5000)))
        await h.close(cache)
        full = {"disk": True}
        real_lock = access.lock_dir
        monkeypatch.setattr(access, "lock_dir", lambda directory: enospc() if full["disk"] else real_lock(directory))
        cache = AgentCache(LIMITS, h.directory, clock=h.clock)
        h.live.append(cache)
        cache.disk.access.relock_first = 0.02
        await cache.lock()
        await cache.open("fp-A")
        assert set(cache.entries) == {kept.key, gone.key}
        assert await load(cache, cache.entries[kept.key])
        assert await cache.delete(T, "agent-2") == 1
        new = cache.put(T, "agent-3", seq(20, 9000), fake_kv(seq(20, 9000)))
        await settle(cache)
        assert new.path is None and gone.path.exists(), "the read-only directory was changed"

        full["disk"] = False
        for _ in range(200):
            if cache.disk.access.handle is not None:
                break
            await asyncio.sleep(0.01)
        await settle(cache)
        assert not gone.path.exists()  # the deletion put off is done
        newer = cache.put(T, "agent-4", seq(20, 7000), fake_kv(seq(20, 7000)))
        await settle(cache)
        assert new.path is not None and newer.path is not None
        assert files(h.directory) == {kept.path.name, new.path.name, newer.path.name}


class TestHungDisk:
    """Reads and writes on their own threads, each bounded: a hung file operation is a miss or a
    failed write, never a stall of the other lane, of the event loop or of shutdown."""

    @pytest.fixture
    def release(self):
        event = threading.Event()
        yield event
        event.set()  # the hung threads finish (whatever the test's outcome)

    def hang(self, monkeypatch, module, name: str, release: threading.Event) -> None:
        real = getattr(module, name)

        def hung(*args):
            release.wait(10)
            return real(*args)

        monkeypatch.setattr(module, name, hung)

    async def test_a_hung_read_holds_up_neither_delete_nor_evict_and_is_a_miss(self, h, monkeypatch, release):
        """while a read hangs, a delete and an evict (its write) complete at once; the read times out
        as a miss, the entry is passed over as suspect (its file stays); shutdown does not wait."""
        cache = await h.open(CacheLimits(ttl=1000.0, min_prefix=4, write_through=False, read_timeout=1.0))
        stuck = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        doomed = cache.put(T, "agent-2", seq(20, 3000), fake_kv(seq(20, 3000)))
        await cache.evict(T, "agent-1")
        await cache.evict(T, "agent-2")
        moving = cache.put(T, "agent-3", seq(20, 5000), fake_kv(seq(20, 5000)))
        doomed_path = doomed.path
        self.hang(monkeypatch, reader, "read_entry", release)
        loading = cache.fetch(stuck)
        await asyncio.sleep(0.05)  # the read is on its thread, hung
        started = time.monotonic()
        assert await asyncio.wait_for(cache.delete(T, "agent-2"), 5.0) == 1
        assert await asyncio.wait_for(cache.evict(T, "agent-3"), 5.0) == [moving]
        assert time.monotonic() - started < 0.5, "delete and evict waited for the hung read"
        assert not doomed_path.exists() and moving.path.exists() and not loading.done()

        assert await asyncio.wait_for(loading, 5.0) is False  # past read_timeout: a miss
        assert not stuck.removed and stuck.path.exists() and stuck.retry_at > time.monotonic()
        assert cache.lookup(T, "agent-1", seq(25)) is MISS  # suspect: passed over for a while
        assert samples(cache, "semcache_cache_disk_errors_total", op="read", errno="ETIMEDOUT") == 1
        started = time.monotonic()
        await asyncio.wait_for(h.close(cache), 5.0)
        assert time.monotonic() - started < 0.5, "shutdown waited for the hung read"

    async def test_a_hung_write_times_out_as_a_failed_write(self, h, monkeypatch, release):
        """a write past write_timeout fails like any failed write: counted, writes paused, the entry
        kept in memory (and written once the disk answers again)."""
        cache = await h.open(CacheLimits(ttl=1000.0, min_prefix=4, write_timeout=0.3))
        cache.write_pause = 0.01
        self.hang(monkeypatch, store, "write", release)
        entry = cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await asyncio.wait_for(settle(cache), 5.0)
        assert entry.dirty and entry.path is None and entry.tier == "memory"
        assert samples(cache, "semcache_cache_disk_errors_total", op="write", errno="ETIMEDOUT") == 1
        monkeypatch.undo()
        release.set()
        await asyncio.sleep(0.02)
        cache.put(T, "agent-2", seq(20, 5000), fake_kv(seq(20, 5000)))
        await settle(cache)
        assert entry.path is not None and not entry.dirty

    async def test_shutdown_abandons_file_work_past_its_bound(self, h, monkeypatch, release):
        """a write still hung when the daemon stops is abandoned after close_timeout: shutdown is
        bounded, whatever the disk does."""
        limits = CacheLimits(ttl=1000.0, min_prefix=4, write_timeout=30.0, close_timeout=0.5)
        cache = await h.open(limits)
        self.hang(monkeypatch, store, "write", release)
        cache.put(T, "agent-1", seq(20), fake_kv(seq(20)))
        await asyncio.sleep(0.05)  # the write is on its thread, hung
        started = time.monotonic()
        await asyncio.wait_for(h.close(cache), 5.0)
        assert time.monotonic() - started < limits.close_timeout + 0.5

    async def test_reads_fail_at_once_while_the_read_lane_is_hung(self, h, monkeypatch, release):
        """with MAX_STUCK reads hung past their timeout, a new read is a miss at once instead of
        queueing behind them; once they return, reads work again."""
        cache = await h.open(CacheLimits(ttl=1000.0, min_prefix=4, read_timeout=0.2))
        entries = [cache.put(T, f"agent-{i}", seq(20, 1000 * (i + 1)), fake_kv(seq(20, 1000 * (i + 1))))
                   for i in range(iothread.MAX_STUCK + 1)]
        for e in entries:
            await cache.evict(T, e.agent)
        self.hang(monkeypatch, reader, "read_entry", release)
        assert await asyncio.gather(*(load(cache, e) for e in entries[:-1])) == [False] * iothread.MAX_STUCK
        started = time.monotonic()
        assert await load(cache, entries[-1]) is False
        assert time.monotonic() - started < 0.1, "the read queued behind the hung ones"
        monkeypatch.undo()
        release.set()
        for _ in range(100):
            if cache.disk.io.reads.stuck == 0:
                break
            await asyncio.sleep(0.01)
        entries[0].retry_at = 0.0
        assert await load(cache, entries[0])


def test_common_prefix():
    """common_prefix counts equal leading tokens of two int arrays, or of two lists of ids."""
    a = np.array([1, 2, 3, 4], np.int32)
    assert common_prefix(a, np.array([1, 2, 9], np.int32)) == 2
    assert common_prefix(a, a[:2]) == 2
    assert common_prefix(a, np.array([], np.int32)) == 0
    assert common_prefix(a, np.array([5], np.int32)) == 0
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 7]) == 1
    assert common_prefix([], [1]) == 0


def test_limits_from_config():
    """CacheLimits.from_config takes the cache_* keys; the defaults agree with Config's."""
    assert CacheLimits.from_config(Config()) == CacheLimits()
    config = Config(cache_memory_budget=1, cache_disk_budget=2, cache_ttl=3.0, cache_min_prefix=4,
                    cache_disk_encoding="int8", cache_write_through=False, cache_tenant_share=0.25)
    assert CacheLimits.from_config(config) == CacheLimits(1, 2, 3.0, 4, "int8", False, 0.25)
    assert CacheLimits(memory_budget=1000, tenant_share=0.25).share(1000) == 250 and CacheLimits().share(1000) is None


async def put_each(h: Harness, cache: AgentCache, tenant: str, agents: list[str], base: int,
                   write: bool = False) -> list:
    """One entry of ENTRY_TOKENS tokens (from base, 2 * base...) for each agent, a clock tick apart;
    with `write`, each one's file work done before the next."""
    made = []
    for i, agent in enumerate(agents):
        h.clock.tick()
        tokens = seq(ENTRY_TOKENS, base * (i + 1))
        made.append(cache.put(tenant, agent, tokens, fake_kv(tokens)))
        await settle(cache) if write else check(cache)
    return made


class TestTenantShare:
    """cache_tenant_share: a tenant past its share of a budget loses its own least recently used
    entries, never another tenant's (older as they may be)."""

    async def test_memory_share_spills_only_the_tenants_own_entries(self, h):
        """room for 4 entries, half of it a tenant's: the other tenant's older entries stay resident."""
        limits = CacheLimits(memory_budget=4 * ENTRY_BYTES, ttl=1000.0, min_prefix=4, tenant_share=0.5)
        cache = await h.open(limits)
        theirs = await put_each(h, cache, OTHER, ["b-0", "b-1"], 1000)
        mine = await put_each(h, cache, T, ["a-0", "a-1", "a-2", "a-3"], 10_000)
        assert [e.tier for e in theirs] == ["memory", "memory"]
        assert [e.tier for e in mine] == ["disk", "disk", "memory", "memory"]
        assert cache.resident.bytes_of(T) == 2 * ENTRY_BYTES
        h.clock.tick()
        assert await load(cache, mine[0])  # read back: the tenant's least recently used one makes room
        check(cache)
        assert [e.tier for e in mine] == ["memory", "disk", "disk", "memory"] and theirs[0].tier == "memory"
        await settle(cache)

    async def test_without_a_share_one_tenant_evicts_everyone(self, h):
        """the default: budgets are shared, the least recently used entries go whoever owns them."""
        cache = await h.open(CacheLimits(memory_budget=4 * ENTRY_BYTES, ttl=1000.0, min_prefix=4))
        [theirs] = await put_each(h, cache, OTHER, ["b"], 1000)
        await put_each(h, cache, T, ["a-0", "a-1", "a-2", "a-3"], 10_000)
        assert theirs.tier == "disk"
        await settle(cache)

    async def test_disk_share_deletes_only_the_tenants_own_files(self, h, tmp_path):
        """disk budget of 4.5 files, half of it a tenant's: it keeps its 2 newest files, the other
        tenant's older files stay; a tenant past its share when the cache opens is trimmed then."""
        size = file_size(tmp_path, ENTRY_TOKENS, h.clock)
        limits = CacheLimits(memory_budget=0, disk_budget=int(4.5 * size), ttl=1000.0, min_prefix=4)
        cache = await h.open(replace(limits, tenant_share=0.5))
        theirs = await put_each(h, cache, OTHER, ["b-0", "b-1"], 1000, write=True)
        mine = await put_each(h, cache, T, ["a-0", "a-1", "a-2", "a-3"], 10_000, write=True)
        assert [e.removed for e in mine] == [True, True, False, False] and not any(e.removed for e in theirs)
        assert files(h.directory) == {e.path.name for e in theirs + mine[2:]}
        assert cache.disk.held(T) == 2 * size <= 0.5 * limits.disk_budget
        cache = await h.reopen(cache, limits=limits)  # no share: with the other tenant gone, it fills the rest
        for agent in ("b-0", "b-1"):
            await cache.delete(OTHER, agent)
        await put_each(h, cache, T, ["a-4", "a-5"], 50_000, write=True)
        assert cache.disk.held(T) == 4 * size
        cache = await h.reopen(cache, limits=replace(limits, tenant_share=0.5))
        await settle(cache)
        assert cache.disk.held(T) == 2 * size
        assert {e.agent for e in cache.entries.values()} == {"a-4", "a-5"}


class TestBookkeeping:
    """Budgets and gauges keep running totals (ledger.py): no operation recounts the entries, so the
    work per operation does not grow with their number (evicting 2,000 of 4,000 took 2.7 s)."""

    @staticmethod
    async def work(monkeypatch, n: int, directory) -> int:
        """Attribute reads on entries during n puts (the second half each spilling one), lookups,
        uses, evicts, deletes and one expire() of about half of them."""
        from semcache.cache import index

        reads = [0]

        class CountingEntry(index.Entry):
            def __getattribute__(self, name):
                reads[0] += 1
                return object.__getattribute__(self, name)

        monkeypatch.setattr(index, "Entry", CountingEntry)
        clock = Clock()
        limits = CacheLimits(memory_budget=n // 2 * 8 * 8, ttl=float(n), min_prefix=4, write_through=False)
        cache = AgentCache(limits, directory, clock=clock)
        for i in range(n):
            clock.tick()
            agent = None if i % 5 == 0 else f"agent-{i % (n // 4)}"
            cache.put(T if i % 2 else OTHER, agent, seq(8, 10 * i), fake_kv(seq(8, 10 * i)))
        for i in range(0, n, 4):
            match = cache.lookup(T, f"agent-{i % (n // 4)}", seq(8, 10 * i) + [1])
            cache.record(match, 9, from_disk=False)
        for i in range(0, n // 4, 8):
            await cache.evict(T, f"agent-{i}")
            await cache.delete(OTHER, f"agent-{i + 1}")
        clock.tick(n // 2)
        cache.expire()
        cache.check_integrity()
        await cache.close()
        return reads[0]

    async def test_work_per_operation_does_not_grow_with_the_entries(self, monkeypatch):
        """4x the entries: about 4x the work in all (log factors aside), not 16x (quadratic)."""
        small = await self.work(monkeypatch, 250, None)
        large = await self.work(monkeypatch, 1000, None)
        assert large < 8 * small, f"{large / small:.1f}x the work for 4x the entries"

    async def test_disk_budget_work_does_not_grow_with_the_files(self, h, monkeypatch):
        """Deleting half of the files past a lowered disk budget: per file, the same work at 4x the files."""

        async def work(n: int) -> int:
            cache = await h.open(CacheLimits(memory_budget=0, disk_budget=1 << 40, ttl=1e9, min_prefix=4))
            for i in range(n):  # entries only on disk, as a restart finds them (no file needed here)
                h.clock.tick()
                entry = store_entry(i)
                cache._index(entry)
                cache.disk.stored[entry.key] = entry
                cache.disk.bytes += entry.file_bytes
            reads[0] = 0
            cache.disk.limits = replace(cache.disk.limits, disk_budget=n // 2 * 100)
            cache.disk.enforce_budget()
            check(cache)
            assert len(cache.entries) == n // 2
            await h.close(cache)
            return reads[0]

        reads = [0]
        from semcache.cache.entry import Entry

        class Counting(Entry):
            def __getattribute__(self, name):
                reads[0] += 1
                return object.__getattribute__(self, name)

        def store_entry(i: int) -> Entry:
            tokens = np.asarray(seq(8, 10 * i), np.int32)
            return Counting(f"{i:016x}", T, f"agent-{i}", True, tokens, "float32", h.clock(), h.clock(),
                            path=h.directory / "entries" / f"{i:016x}.safetensors", file_bytes=100)

        small, large = await work(250), await work(1000)
        assert large < 8 * small, f"{large / small:.1f}x the work for 4x the files"

    async def test_totals_match_a_recount_after_random_operations(self, h):
        """Random puts, lookups, uses, loads, evicts, deletes, expiries and settles over 3 tenants with
        a tenant share: after each, every running total equals a recount (check_integrity)."""
        import random

        rng = random.Random(11)
        limits = CacheLimits(memory_budget=6 * 8 * 30, disk_budget=1 << 20, ttl=50.0, min_prefix=4, tenant_share=0.5)
        cache = await h.open(limits)
        tenants, agents = ["t0", "t1", "t2"], [None, "a0", "a1", "a2", "a3"]
        history: list[tuple[str, str | None, list[int]]] = []
        for step in range(300):
            op = rng.random()
            tenant, agent = rng.choice(tenants), rng.choice(agents)
            if op < 0.4 or not history:
                base = rng.choice(history)[2] if history and rng.random() < 0.5 else seq(10, rng.randrange(50) * 100)
                tokens = base + seq(rng.randrange(0, 20), 9000 + step * 20)
                cache.put(tenant, agent, tokens, fake_kv(tokens), background=rng.random() < 0.2,
                          fresh_start=rng.random() < 0.1)
                history.append((tenant, agent, tokens))
            elif op < 0.65:
                tenant, agent, tokens = rng.choice(history)
                match = cache.lookup(tenant, agent, tokens + [1])
                if match.entry is not None and rng.random() < 0.5:
                    await load(cache, match.entry)
                cache.record(match, len(tokens) + 1, from_disk=False)
            elif op < 0.75:
                await cache.evict(tenant, agent or "a0")
            elif op < 0.82:
                await cache.delete(tenant, agent or "a1")
            elif op < 0.9:
                h.clock.tick(rng.random() * 20)
                cache.expire()
            else:
                await cache.settle()
            check(cache)
        await settle(cache)
