"""Disconnect storm: streamed requests whose clients drop at random points; how soon the daemon's
capacity is back and a new request is admitted."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp

from perf.common import percentiles
from perf.stress.conversations import Agent, chat_request, turn
from perf.stress.observe import health, mean_step_seconds, metrics
from perf.stress.rawhttp import Conn, host_port, open_warm


async def disconnect_storm(base: str, n: int = 48, max_tokens: int = 64, max_chunks: int = 12,
                           seed: int = 0, poll: float = 0.002) -> dict:
    """n streamed requests whose clients drop at random points (queued, before or after the first
    token; RST or FIN); then how long until nothing runs or waits, against the mean step time,
    and how long a new request waits for its slot."""
    rng = random.Random(seed)
    host, port = host_port(base)
    conns = await open_warm(host, port, n)
    before = await metrics(base)
    plan = [(rng.randint(0, max_chunks), rng.random() < 0.5, rng.uniform(0, 0.3)) for _ in range(n)]
    dropped = await asyncio.gather(*(_drop(i, c, max_tokens, *p) for i, (c, p) in enumerate(zip(conns, plan))))
    last = max(t for t, _ in dropped)
    while True:  # the daemon's own view: /health/live reads the scheduler's counts
        _, h = await health(base, "/health/live")
        if h["active"] == 0 and h["queue_depth"] == 0:
            break
        await asyncio.sleep(poll)
    idle_after = time.perf_counter() - last
    after = await metrics(base)
    step = mean_step_seconds(before, after)
    queue_wait = await _probe_queue_wait(base)
    final = await metrics(base)
    gauges = {k: final[k] for k in ("semcache_active_sequences", "semcache_queue_depth")}
    return {"n": n, "dropped_after_chunks": percentiles([k for _, k in dropped], (0, 50, 100)),
            "last_drop_at": last, "idle_after_last_drop_s": idle_after, "mean_step_s": step,
            "probe_queue_wait_s": queue_wait, "gauges_after": gauges,
            "checks": {"capacity_back_within_one_step": idle_after <= step,
                       "new_request_admitted_at_next_step": queue_wait <= step + 0.05,
                       "gauges_zero": not any(gauges.values())}}


async def _drop(i: int, conn: Conn, max_tokens: int, chunks: int, rst: bool, wait: float) -> tuple[float, int]:
    """Send a streamed request, read `chunks` SSE chunks (0: none, after `wait` s), then drop."""
    messages = [{"role": "user", "content": f"Write a long story about lighthouse number {i}."}]
    path, body, headers = chat_request(messages, max_tokens, anthropic=i % 2 == 1, stream=True)
    conn.send("POST", path, body, headers)
    read = 0
    if chunks == 0:
        await asyncio.sleep(wait)
    else:
        await conn.head()
        async for _ in conn.chunks():
            read += 1
            if read >= chunks:
                break
    conn.abort() if rst else conn.close()
    return time.perf_counter(), read


async def _probe_queue_wait(base: str) -> float:
    """Queue wait of one request sent to an idle daemon (the histogram's sum moves by exactly it)."""
    before = await metrics(base)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        result = await turn(session, base, Agent(f"probe-{time.time_ns()}", False), 2, True)
    after = await metrics(base)
    assert result["status"] == 200, result
    return after["semcache_queue_wait_seconds_sum"] - before["semcache_queue_wait_seconds_sum"]
