"""Overload: a burst of requests far past the queue's places at an idle daemon, then a second burst
while the first is being served; how fast and how cleanly the surplus is refused."""

from __future__ import annotations

import asyncio
import gc
import time
from contextlib import contextmanager

from perf.common import percentiles
from perf.stress.conversations import chat_request
from perf.stress.observe import answers, health
from perf.stress.rawhttp import Conn, Response, host_port, open_warm

REFUSALS = (429, 503, 529)


async def overload(base: str, n: int = 200, max_active: int = 16, max_queue: int = 64, max_tokens: int = 4,
                   busy: int = 100, timeout: float = 300.0) -> dict:
    """n requests at once on n open connections (alternating dialects) against a queue of max_queue
    at an idle (warmed-up) daemon; half a second later, while the accepted ones are being served,
    `busy` more, refused while the MLX thread computes.

    "At most max_active + max_queue served": the queue bounds requests waiting, and the batch those
    running, so at any moment at most max_active + max_queue are accepted and unfinished. A request
    that finished frees its place for a later one, so the bound on the 200s is max_active +
    max_queue plus those that had already finished when the last refusal was sent (zero when the
    bursts arrive faster than a request is served, as here)."""
    host, port = host_port(base)
    warm = await answers(base)  # the chat template is compiled on a daemon's first request
    conns = await open_warm(host, port, n + busy)
    with no_collector_pauses():
        tasks = _fire(conns[:n], max_tokens, timeout)
        await asyncio.sleep(0.5)
        tasks += _fire(conns[n:], max_tokens, timeout, first=n)
        start = time.perf_counter()
        results = await asyncio.gather(*tasks)
    for c in conns:
        c.close()
    wall = time.perf_counter() - start
    report = _overload_report(results, conns, n, max_active, max_queue)
    ready, _ = await health(base)
    report["checks"] |= {"answers_before": warm, "ready_after": ready == 200, "answers_after": await answers(base)}
    return report | {"wall_s": wall}


@contextmanager
def no_collector_pauses():
    """No garbage collection in this (measuring) process while it times a burst, as timeit does: a
    full collection of a large heap (pytest's, after the rest of the suite) pauses the client, and
    every refusal of the burst read after the pause gets the same late time."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _fire(conns: list[Conn], max_tokens: int, timeout: float, first: int = 0) -> list[asyncio.Task]:
    """Send one request on each connection (all written before any answer is read)."""
    for i, conn in enumerate(conns, first):
        path, body, headers = chat_request([{"role": "user", "content": f"Say one word about the number {i}."}],
                                           max_tokens, anthropic=i % 2 == 1)
        conn.send("POST", path, body, headers)

    async def receive(conn: Conn) -> Response:
        try:
            return await asyncio.wait_for(conn.response(), timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return Response(0, {}, seconds=time.perf_counter() - conn.sent_at)

    return [asyncio.create_task(receive(c)) for c in conns]


def _overload_report(results: list[Response], conns: list[Conn], n: int, max_active: int, max_queue: int) -> dict:
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    refused = [r for r in results if r.status in REFUSALS]
    served = [(r, c) for r, c in zip(results, conns) if r.status == 200]
    last_refusal = max((c.sent_at + r.seconds for r, c in zip(results, conns) if r.status in REFUSALS), default=0)
    done_before = sum(1 for r, c in served if c.sent_at + r.seconds < last_refusal)
    refusal_ms = percentiles([r.seconds * 1000 for r in refused], (50, 95, 100))
    busy_ms = percentiles([r.seconds * 1000 for r in results[n:] if r.status in REFUSALS], (50, 95, 100))
    checks = {
        "statuses_allowed": all(r.status in (200, *REFUSALS) for r in results),
        "refusals_have_retry_after": all("retry-after" in r.headers for r in refused),
        "refusal_p95_within_100ms": bool(refused) and refusal_ms["p95"] <= 100,
        "served_within_max_active_plus_max_queue": len(served) <= max_active + max_queue + done_before,
        "no_timeouts": not any(r.status == 0 for r in results),
        "no_500s": not any(r.status >= 500 and r.status not in REFUSALS for r in results),
    }
    return {"n": n, "busy": len(results) - n, "max_active": max_active, "max_queue": max_queue,
            "statuses": statuses, "num_served": len(served), "num_refused": len(refused),
            "served_done_before_last_refusal": done_before, "refusal_ms": refusal_ms,
            "refusal_ms_idle_burst": percentiles([r.seconds * 1000 for r in results[:n] if r.status in REFUSALS],
                                                        (50, 95, 100)),
            "refusal_ms_busy_burst": busy_ms,
            "served_s": percentiles([r.seconds for r, _ in served], (50, 95, 100)), "checks": checks}
