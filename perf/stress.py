"""Bounded loopback stress (issue 5 §2): overload, agent bursts, sustained load, disconnect storms.

One implementation for `python -m perf stress` and tests/test_stress.py: each workload takes a
daemon's base URL, runs for a bounded time, and returns its measurements plus `checks`, a dict of
named pass/fail verdicts (the tests assert them; the perf report records them).

Latencies of refusals are measured on raw keep-alive HTTP/1.1 connections opened (and used once)
before the burst, so they time the server, not a client library's per-request overhead.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from perf import servers
from perf.common import (SHORT_QUESTIONS, machine_info, parse_metrics, parse_reply, percentiles, rounded,
                         rss_mb, short_system_prompt)

PARTS = ("overload", "agents", "sustained", "disconnect")
REFUSALS = (429, 503, 529)
ANTHROPIC = {"anthropic-version": "2023-06-01"}


# Raw HTTP/1.1 connections -------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    seconds: float = 0.0  # from the request's last byte written to the response head read


class Conn:
    """One keep-alive HTTP/1.1 connection on raw asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.sent_at = 0.0

    @classmethod
    async def open(cls, host: str, port: int) -> "Conn":
        return cls(*await asyncio.open_connection(host, port))

    def send(self, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(data)}"]
        head += [f"{k}: {v}" for k, v in {"Content-Type": "application/json", **(headers or {})}.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        self.sent_at = time.perf_counter()

    async def head(self) -> Response:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        seconds = time.perf_counter() - self.sent_at
        lines = raw.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        return Response(int(lines[0].split()[1]), headers, seconds=seconds)

    async def response(self) -> Response:
        """The whole response; a chunked body is joined."""
        r = await self.head()
        if "content-length" in r.headers:
            r.body = await self.reader.readexactly(int(r.headers["content-length"]))
        else:
            r.body = b"".join([chunk async for chunk in self.chunks()])
        return r

    async def chunks(self):
        """The chunks of a chunked body (each SSE event the daemon writes is one chunk)."""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            yield data[:-2]

    def abort(self) -> None:
        """Drop the connection at once (RST), as a client that crashed would."""
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()


async def open_warm(host: str, port: int, n: int) -> list[Conn]:
    """n connections, each used once (GET /health/live) so the server has set it up fully."""
    conns = await asyncio.gather(*(Conn.open(host, port) for _ in range(n)))
    for c in conns:
        c.send("GET", "/health/live")
    await asyncio.gather(*(c.response() for c in conns))
    return list(conns)


def host_port(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


# Requests in both dialects ------------------------------------------------------------------------


def chat_request(messages: list[dict], max_tokens: int, anthropic: bool, stream: bool = False,
                 system: str | None = None) -> tuple[str, dict, dict]:
    """(path, body, headers) of a greedy chat request in one dialect."""
    body: dict = {"model": "semcache", "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if anthropic:
        return "/v1/messages", {**body, "messages": messages, **({"system": system} if system else {})}, ANTHROPIC
    prefix = [{"role": "system", "content": system}] if system else []
    if stream:
        body["stream_options"] = {"include_usage": True}
    return "/v1/chat/completions", {**body, "messages": prefix + messages}, {}


@dataclass
class Agent:
    """One conversation: its turns are sequential; the history grows by each question and reply."""

    name: str
    anthropic: bool
    system: str = ""
    history: list[dict] = field(default_factory=list)
    turns: int = 0

    def __post_init__(self):
        self.system = self.system or short_system_prompt(self.name)


async def turn(session: aiohttp.ClientSession, base: str, agent: Agent, max_tokens: int, stream: bool) -> dict:
    """One turn of `agent`; appends the exchange to its history. Never raises for an HTTP status."""
    agent.history.append({"role": "user", "content": SHORT_QUESTIONS[agent.turns % len(SHORT_QUESTIONS)]})
    path, body, headers = chat_request(agent.history, max_tokens, agent.anthropic, stream, agent.system)
    start = time.perf_counter()
    try:
        async with session.post(base + path, json=body, headers={**headers, "X-Agent-ID": agent.name}) as r:
            raw, status = await r.read(), r.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raw, status = repr(exc).encode(), "timeout" if isinstance(exc, asyncio.TimeoutError) else "error"
    out = {"agent": agent.name, "turn": agent.turns, "status": status, "stream": stream, "start": start,
           "seconds": time.perf_counter() - start, "cached": None}
    if status == 200:
        text, out["cached"] = parse_reply(raw, agent.anthropic, stream)
        agent.history.append({"role": "assistant", "content": text.strip() or "."})
    else:
        agent.history.pop()
        out["error"] = raw[:300].decode(errors="replace")
    agent.turns += 1
    return out


# Observing the daemon ---------------------------------------------------------------------------


async def get(base: str, path: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(base + path) as r:
            return r.status, await r.read()


async def metrics(base: str) -> dict[str, float]:
    """Every sample of /metrics, keyed by name plus labels as written."""
    _, text = await get(base, "/metrics")
    return parse_metrics(text.decode())


async def health(base: str, path: str = "/health/ready") -> tuple[int, dict]:
    status, body = await get(base, path)
    return status, json.loads(body)


def mean_step_seconds(before: dict, after: dict) -> float:
    n = after["semcache_step_duration_seconds_count"] - before.get("semcache_step_duration_seconds_count", 0)
    total = after["semcache_step_duration_seconds_sum"] - before.get("semcache_step_duration_seconds_sum", 0)
    return total / n if n else float("nan")


async def answers(base: str) -> bool:
    """A normal request (OpenAI, then Anthropic) gets a 200 with text."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for anthropic in (False, True):
            result = await turn(session, base, Agent(f"probe-{anthropic:d}-{time.time_ns()}", anthropic), 4, False)
            if result["status"] != 200:
                return False
    return True


# 1. Overload ----------------------------------------------------------------------------------------


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


# 2. Agent bursts ------------------------------------------------------------------------------------


async def agent_bursts(base: str, agents: int = 10, turns: int = 50, max_tokens: int = 4,
                       timeout: float = 600.0) -> dict:
    """`agents` agents at once, each sending `turns` turns back to back, with no pause: odd agents
    speak Anthropic, even ones OpenAI; turns alternate between streamed and not."""
    run = f"{time.time_ns() % 10**9:x}"
    pool = [Agent(f"burst-{run}-{i}", anthropic=i % 2 == 1) for i in range(agents)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def talk(agent: Agent) -> list[dict]:
            return [await turn(session, base, agent, max_tokens, stream=t % 2 == 1) for t in range(turns)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(talk(a) for a in pool)) for r in rs]
        wall = time.perf_counter() - start
    later = [r for r in results if r["turn"] > 0]
    uncached = [(r["agent"], r["turn"], r["cached"]) for r in later if not r["cached"]]
    failed = [(r["agent"], r["turn"], r["status"], r.get("error")) for r in results if r["status"] != 200]
    return {"agents": agents, "turns": turns, "max_tokens": max_tokens, "requests": len(results), "wall_s": wall,
            "latency_s": percentiles([r["seconds"] for r in results], (50, 95, 100)),
            "cached_tokens_later_turns": percentiles([r["cached"] or 0 for r in later], (0, 50)),
            "failed": failed[:20], "uncached_later_turns": uncached[:20],
            "results": [{k: r[k] for k in ("agent", "turn", "status", "stream", "seconds", "cached")} for r in results],
            "checks": {"all_served": not failed, "later_turns_cached": not uncached}}


# 3. Sustained load ----------------------------------------------------------------------------------


@dataclass
class Windows:
    """How a run of `duration` seconds is judged: a warm-up, then a first and a last window."""

    duration: float

    @property
    def length(self) -> float:
        return min(60.0, self.duration / 3)

    @property
    def warmup(self) -> float:
        return min(60.0, self.duration / 6)

    def first(self, t: float) -> bool:
        return self.warmup <= t < self.warmup + self.length

    def last(self, t: float) -> bool:
        return t >= self.duration - self.length


class Traffic:
    """A fixed population of conversations whose ages are spread over 0..max_turns-1 from the start
    (earlier turns made up), so the mix of short and long prompts is the same all run. A session
    takes an idle agent at random for 1–3 turns; an agent at max_turns is replaced by a new one.
    Whether an agent's KV is in memory, on disk or gone is then up to the cache's budgets."""

    def __init__(self, seed: int, population: int = 32, max_turns: int = 10):
        self.rng = random.Random(seed)
        self.max_turns = max_turns
        self.num_agents = 0
        self.idle = [self._new(age=i % max_turns) for i in range(population)]

    def _new(self, age: int = 0) -> Agent:
        self.num_agents += 1
        agent = Agent(f"load-{self.rng.getrandbits(32):08x}-{self.num_agents}", anthropic=self.rng.random() < 0.5)
        for k in range(age):
            agent.history += [{"role": "user", "content": SHORT_QUESTIONS[k % len(SHORT_QUESTIONS)]},
                              {"role": "assistant", "content": f"Noted: point {k}."}]
        agent.turns = age
        return agent

    def session(self) -> tuple[Agent, int]:
        return self.idle.pop(self.rng.randrange(len(self.idle))), self.rng.randint(1, 3)

    def retire(self, agent: Agent) -> None:
        self.idle.append(agent if agent.turns < self.max_turns else self._new())


async def sustained(base: str, pid: int, duration: float, memory_budget: int, disk_budget: int,
                    concurrency: int = 6, population: int = 32, max_tokens: int = 8, seed: int = 0,
                    rss_margin: float = 0.10) -> dict:
    """`concurrency` agent loops (see Traffic) for `duration` seconds, streamed or not at random,
    while RSS, the cache gauges and the engine's step times are sampled. Before the clock starts,
    every agent of the population takes one turn, so the run does not begin with a cold cache."""
    traffic, results, samples = Traffic(seed, population), [], []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        slots = asyncio.Semaphore(concurrency)

        async def first_turn(agent: Agent) -> dict:
            async with slots:
                return await turn(session, base, agent, max_tokens, stream=False)

        warm = await asyncio.gather(*(first_turn(a) for a in traffic.idle))
        start = time.perf_counter()
        stop_at = start + duration

        async def loop() -> None:
            while time.perf_counter() < stop_at:
                agent, n = traffic.session()
                for _ in range(n):
                    if time.perf_counter() >= stop_at:
                        break
                    results.append(await turn(session, base, agent, max_tokens, traffic.rng.random() < 0.5))
                traffic.retire(agent)

        sampler = asyncio.create_task(_sample(base, pid, start, 0.5, samples))
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        if not sampler.cancelled() and sampler.exception() is not None:  # it died early: say why
            raise sampler.exception()
    for r in results:
        r["start"] -= start
    report = _sustained_report(results, samples, Windows(duration), memory_budget, disk_budget, rss_margin)
    warm_errors = [(r["agent"], r["status"], r.get("error")) for r in warm if r["status"] != 200]
    report["checks"]["no_errors"] &= not warm_errors
    return report | {"concurrency": concurrency, "population": population, "max_tokens": max_tokens,
                     "agents": traffic.num_agents, "warm_up_errors": warm_errors[:20]}


async def _sample(base: str, pid: int, start: float, every: float, samples: list[dict]) -> None:
    """RSS, cache tier bytes, the largest memory entry and the step counters, every `every` seconds
    until cancelled."""
    while True:
        m = await metrics(base)
        _, listing = await get(base, "/v1/agents")
        entries = [e["bytes"] for e in json.loads(listing)["data"] if e["tier"] == "memory"]
        samples.append({"t": time.perf_counter() - start, "rss_mb": await asyncio.to_thread(rss_mb, pid),
                        **{tier: m.get(f'semcache_cache_bytes{{tier="{tier}"}}', 0.0)
                           for tier in ("memory", "disk", "writing")},
                        "largest_entry": max(entries, default=0),
                        "steps": m["semcache_step_duration_seconds_count"],
                        "step_seconds": m["semcache_step_duration_seconds_sum"]})
        await asyncio.sleep(every)


def _sustained_report(results: list[dict], samples: list[dict], w: Windows, memory_budget: int,
                      disk_budget: int, rss_margin: float) -> dict:
    first = [r["seconds"] for r in results if w.first(r["start"])]
    last = [r["seconds"] for r in results if w.last(r["start"])]
    p95_first, p95_last = percentiles(first).get("p95"), percentiles(last).get("p95")
    thirds = [[s["rss_mb"] for s in samples if k * w.duration / 3 <= s["t"] < (k + 1) * w.duration / 3]
              for k in range(3)]
    rss_middle, rss_last = max(thirds[1], default=0.0), max(thirds[2], default=0.0)
    largest = max((s["largest_entry"] for s in samples), default=0)
    memory_peak = max((s["memory"] for s in samples), default=0)
    disk_peak = max((s["disk"] for s in samples), default=0)
    errors = [(r["agent"], r["turn"], r["status"], r.get("error")) for r in results if r["status"] != 200]
    checks = {
        "memory_within_budget_plus_one_entry": memory_peak <= memory_budget + largest,
        "disk_within_budget": disk_peak <= disk_budget,
        "rss_flat": bool(thirds[1]) and rss_last <= rss_middle * (1 + rss_margin),
        "p95_last_within_1_5x_first": bool(first and last) and p95_last <= 1.5 * p95_first,
        "no_errors": not errors,
        "disk_tier_used": disk_peak > 0,
    }
    hits = sum(1 for r in results if r["cached"])
    return {"duration_s": w.duration, "requests": len(results), "requests_with_cached_tokens": hits,
            "windows_s": {"warmup": w.warmup, "length": w.length},
            "p95_first_window_s": p95_first, "p95_last_window_s": p95_last,
            "p95_last_over_first": p95_last / p95_first if p95_first and p95_last else None,
            "p50_first_last_window_s": [percentiles(first).get("p50"), percentiles(last).get("p50")],
            "mean_step_first_last_window_s": [_mean_step([s for s in samples if w.first(s["t"])]),
                                              _mean_step([s for s in samples if w.last(s["t"])])],
            "rss_mb": {"first_third_max": max(thirds[0], default=0.0), "middle_third_max": rss_middle,
                       "last_third_max": rss_last, "margin": rss_margin,
                       "slope_per_min_after_first_third": _slope([(s["t"] / 60, s["rss_mb"]) for s in samples
                                                                  if s["t"] >= w.duration / 3])},
            "cache_peak_bytes": {"memory": memory_peak, "disk": disk_peak,
                                 "writing": max((s["writing"] for s in samples), default=0),
                                 "memory_plus_writing": max((s["memory"] + s["writing"] for s in samples), default=0)},
            "budgets": {"memory": memory_budget, "disk": disk_budget}, "largest_memory_entry": largest,
            "errors": errors[:20], "samples_every_2s": samples[::4], "checks": checks,
            "results": [{k: r[k] for k in ("start", "seconds", "status", "stream", "turn", "cached")} for r in results]}


def _mean_step(samples: list[dict]) -> float | None:
    """Mean engine step time between the first and the last of `samples`."""
    if len(samples) < 2 or samples[-1]["steps"] == samples[0]["steps"]:
        return None
    return (samples[-1]["step_seconds"] - samples[0]["step_seconds"]) / (samples[-1]["steps"] - samples[0]["steps"])


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


# 4. Disconnect storm --------------------------------------------------------------------------------


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


# The command line -----------------------------------------------------------------------------------


def env_for(part: str, args) -> dict[str, str]:
    base = {"SEMCACHE_MAX_QUEUE_WAIT": "600"}
    return base | {
        "overload": {"SEMCACHE_MAX_ACTIVE": str(args.max_active), "SEMCACHE_MAX_QUEUE": str(args.max_queue)},
        "sustained": {"SEMCACHE_CACHE_MEMORY_BUDGET": str(args.memory_budget),
                      "SEMCACHE_CACHE_DISK_BUDGET": str(args.disk_budget)},
    }.get(part, {})


async def run_part(part: str, d: servers.Daemon, args) -> dict:
    if part == "overload":
        return await overload(d.base, args.requests, args.max_active, args.max_queue)
    if part == "agents":
        return await agent_bursts(d.base, args.agents, args.turns)
    if part == "sustained":
        return await sustained(d.base, d.pid, args.duration, args.memory_budget, args.disk_budget,
                               concurrency=args.concurrency, population=args.population)
    return await disconnect_storm(d.base)


def configure(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("perf-stress.json"))
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of sustained load")
    parser.add_argument("--concurrency", type=int, default=6, help="agent loops of the sustained load")
    parser.add_argument("--population", type=int, default=32, help="conversations the sustained load draws from")
    parser.add_argument("--requests", type=int, default=200, help="requests of the overload burst")
    parser.add_argument("--max-active", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--memory-budget", type=int, default=64 << 20, help="sustained: cache_memory_budget bytes")
    parser.add_argument("--disk-budget", type=int, default=256 << 20, help="sustained: cache_disk_budget bytes")


def main(args) -> dict:
    parts = {}
    with tempfile.TemporaryDirectory(prefix="semcache-perf-stress-") as tmp:
        for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
            if part not in PARTS:
                raise SystemExit(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
            print(f"{part} ...", flush=True)
            load = os.getloadavg()  # this machine is shared: the other processes' load, for context
            with servers.daemon(Path(tmp), part, env_for(part, args)) as d:
                parts[part] = asyncio.run(run_part(part, d, args)) | {"loadavg_before": load,
                                                                      "loadavg_after": os.getloadavg()}
            print(f"  checks: {parts[part]['checks']}", flush=True)
    report = {"benchmark": "stress", "machine": machine_info(), "summary": summarise(parts), "parts": parts}
    args.out.write_text(to_json(rounded(report)) + "\n")
    return report


def to_json(value, depth: int = 0) -> str:
    """Indented JSON, except that each row of a list of objects (samples, requests) is one line."""
    pad, end = "  " * (depth + 1), "\n" + "  " * depth
    if isinstance(value, dict) and value:
        items = (f"{pad}{json.dumps(k)}: {to_json(v, depth + 1)}" for k, v in value.items())
        return "{\n" + ",\n".join(items) + end + "}"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "[\n" + ",\n".join(pad + json.dumps(v) for v in value) + end + "]"
    return json.dumps(value)


def summarise(parts: dict) -> dict:
    """The numbers each bullet of the issue asks for, and every check."""
    keys = {"overload": ("statuses", "num_served", "refusal_ms"),
            "agents": ("requests", "wall_s", "latency_s", "cached_tokens_later_turns"),
            "sustained": ("duration_s", "requests", "p95_first_window_s", "p95_last_window_s", "p95_last_over_first",
                          "rss_mb", "cache_peak_bytes", "budgets", "largest_memory_entry"),
            "disconnect": ("idle_after_last_drop_s", "mean_step_s", "probe_queue_wait_s", "gauges_after")}
    return {part: {k: r[k] for k in (*keys[part], "loadavg_before", "loadavg_after")}
            | {"checks": r["checks"], "passed": all(r["checks"].values())} for part, r in parts.items()}
