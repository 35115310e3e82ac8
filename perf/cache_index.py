"""The agent cache's bookkeeping on the event loop: put, lookup and evict with many entries.

No model, no files: `entries` synthetic entries of tiny KV (one layer, one head, one value per token)
spread over tenants and agents (a tenth anonymous, a fifth continuing their agent's previous turn,
which replaces it), in a memory-only cache. Each operation is timed alone, so the percentiles are the event loop's cost
of one call: put (no eviction), lookup (own-agent hits, tenant-wide hits through the trie, misses),
put that spills the least recently used entry past the memory budget, evict and delete of one agent
(the /v1/agents API), and one expire() that drops half of the entries at once.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

from perf.common import machine_info, percentiles, rounded

TOKENS = 48  # per entry: a tenant-wide prefix of 16 tokens, then the entry's own
MIN_PREFIX = 8
TARGET_P99_MS = 1.0  # put, lookup and evict, each


def configure(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("perf-cache-index.json"))
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--ops", type=int, default=5_000, help="lookups, spilling puts, evicts and deletes each")
    parser.add_argument("--seed", type=int, default=7)


def main(args) -> dict:
    return asyncio.run(run(args.out, args.entries, args.tenants, args.ops, args.seed))


def kv(n: int):
    import numpy as np

    from semcache.cache.kvdata import KVData

    a = np.zeros((1, 1, n, 1), np.float16)
    return KVData(((a, a),), "float16")


class Clock:
    """Time moves 1 ms a call: every use is distinct, and expire() can cut the history in half."""

    def __init__(self) -> None:
        self.now = 1e9

    def __call__(self) -> float:
        self.now += 1e-3
        return self.now


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


async def timed_async(coro) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


def stats(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds] or [0.0]
    return {"n": len(seconds), **percentiles(ms, (50, 99)), "max": max(ms), "mean": statistics.fmean(ms)}


class FullCollections:
    """The pauses of Python's full (generation 2) garbage collections meanwhile: a process-wide
    pause that lands on whichever operation allocates at the time (its max, not its p99)."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif info["generation"] == 2:
            self.pauses.append(time.perf_counter() - self._start)


async def run(out: Path, entries: int = 50_000, tenants: int = 50, ops: int = 5_000, seed: int = 7) -> dict:
    from semcache.cache.index import AgentCache, CacheLimits

    rng = random.Random(seed)
    nbytes = kv(TOKENS).nbytes
    limits = CacheLimits(memory_budget=1 << 40, disk_budget=0, ttl=1e9, min_prefix=MIN_PREFIX)
    cache = AgentCache(limits, None, clock=Clock())
    agents_per_tenant = max(1, entries // tenants // 2)
    made: list[tuple[str, str | None, list[int]]] = []
    last: dict[tuple[str, str], list[int]] = {}

    def sequence(i: int, tenant: int) -> tuple[str, str | None, list[int]]:
        t = f"tenant-{tenant}"
        if rng.random() < 0.1:
            return t, None, [tenant] * 16 + [100_000 + i] * (TOKENS - 16)
        agent = f"agent-{rng.randrange(agents_per_tenant)}"
        previous = last.get((t, agent))
        if previous is not None and rng.random() < 0.2:  # the next turn: extends (replaces) the previous one
            tokens = previous + [200_000 + i] * 8
        else:
            tokens = [tenant] * 16 + [i] * (TOKENS - 16)
        last[(t, agent)] = tokens
        return t, agent, tokens

    def put(tenant: str, agent: str | None, tokens: list[int]) -> float:
        seconds, _ = timed(cache.put, tenant, agent, tokens, kv(len(tokens)))
        made.append((tenant, agent, tokens))
        return seconds

    collections = FullCollections()
    gc.callbacks.append(collections)
    started = time.perf_counter()
    puts = []
    while len(cache.entries) < entries:  # a continuation replaces its agent's previous entry
        puts.append(put(*sequence(len(puts), len(puts) % tenants)))
    fill_s = time.perf_counter() - started
    live = len(cache.entries)
    print(f"  {len(puts)} puts in {fill_s:.1f} s, {live} entries live", flush=True)

    lookups = []
    for _ in range(ops):
        tenant, agent, tokens = rng.choice(made)
        kind = rng.random()
        prompt = tokens + [7, 8] if kind < 0.8 else [999_999] * TOKENS
        seconds, _ = timed(cache.lookup, tenant, agent if kind < 0.5 else None, prompt)
        lookups.append(seconds)

    cache.limits = replace(limits, memory_budget=cache.memory_bytes)  # full: each put now spills (drops) one
    spilling = [put(*sequence(len(made), i % tenants)) for i in range(ops)]
    named = list({(t, a) for t, a, _ in made if a is not None})
    rng.shuffle(named)
    evicts = [await timed_async(cache.evict(t, a)) for t, a in named[:ops]]
    deletes = [await timed_async(cache.delete(t, a)) for t, a in named[ops:2 * ops]]
    before = len(cache.entries)
    median = sorted(e.last_use for e in cache.entries.values())[before // 2]
    cache.limits = replace(cache.limits, ttl=cache.clock.now - median)  # half of the entries are past it
    expire_s, _ = timed(cache.expire)
    gc.callbacks.remove(collections)
    p99s = {"put": stats(puts)["p99"], "lookup": stats(lookups)["p99"], "put_spilling_one": stats(spilling)["p99"],
            "evict_agent": stats(evicts)["p99"]}
    summary = {
        "entries_live": live,
        "put_ms": stats(puts), "lookup_ms": stats(lookups), "put_spilling_one_ms": stats(spilling),
        "evict_agent_ms": stats(evicts), "delete_agent_ms": stats(deletes),
        "expire": {"entries_before": before, "expired": before - len(cache.entries), "ms": expire_s * 1000},
        "fill_s": fill_s,
        "gc_full_collections_ms": stats(collections.pauses),
        "target_p99_ms": TARGET_P99_MS, "meets_target": all(p <= TARGET_P99_MS for p in p99s.values()),
    }
    report = {"benchmark": "cache-index", "machine": machine_info(), "summary": rounded(summary),
              "params": {"entries": entries, "tenants": tenants, "ops": ops, "seed": seed, "tokens": TOKENS,
                         "entry_bytes": nbytes}}
    await cache.close()
    out.write_text(json.dumps(report, indent=2))
    return report
