"""Sustained load: agent conversations of every length for minutes on small cache budgets; whether
stored KV stays within the budgets, RSS stays flat and latency does not drift."""

from __future__ import annotations

import asyncio
import json
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from perf.common import SHORT_QUESTIONS, percentiles, rss_mb
from perf.stress.conversations import Agent, turn
from perf.stress.observe import get, metrics


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
        warm = await _warm_up(session, base, traffic, concurrency, max_tokens)
        start = time.perf_counter()
        async with _sampling(base, pid, start, samples):
            await asyncio.gather(*(_loop(session, base, traffic, start + duration, max_tokens, results)
                                   for _ in range(concurrency)))
    for r in results:
        r["start"] -= start
    report = _sustained_report(results, samples, Windows(duration), memory_budget, disk_budget, rss_margin)
    warm_errors = [(r["agent"], r["status"], r.get("error")) for r in warm if r["status"] != 200]
    report["checks"]["no_errors"] &= not warm_errors
    return report | {"concurrency": concurrency, "population": population, "max_tokens": max_tokens,
                     "agents": traffic.num_agents, "warm_up_errors": warm_errors[:20]}


async def _warm_up(session: aiohttp.ClientSession, base: str, traffic: Traffic, concurrency: int,
                   max_tokens: int) -> list[dict]:
    """One non-streamed turn of every idle agent, at most `concurrency` at a time."""
    slots = asyncio.Semaphore(concurrency)

    async def first_turn(agent: Agent) -> dict:
        async with slots:
            return await turn(session, base, agent, max_tokens, stream=False)

    return await asyncio.gather(*(first_turn(a) for a in traffic.idle))


async def _loop(session: aiohttp.ClientSession, base: str, traffic: Traffic, stop_at: float, max_tokens: int,
                results: list[dict]) -> None:
    """Sessions of 1-3 turns of agents drawn from `traffic`, until `stop_at`."""
    while time.perf_counter() < stop_at:
        agent, n = traffic.session()
        for _ in range(n):
            if time.perf_counter() >= stop_at:
                break
            results.append(await turn(session, base, agent, max_tokens, traffic.rng.random() < 0.5))
        traffic.retire(agent)


@asynccontextmanager
async def _sampling(base: str, pid: int, start: float, samples: list[dict]):
    """_sample every 0.5 s while the body runs; an error that stopped it early is raised after."""
    sampler = asyncio.create_task(_sample(base, pid, start, 0.5, samples))
    yield
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)
    if not sampler.cancelled() and sampler.exception() is not None:  # it died early: say why
        raise sampler.exception()


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
    windows = _windows(results, samples, w)
    p95_first, p95_last = windows["p95_first_window_s"], windows["p95_last_window_s"]
    rss, rss_flat = _rss(samples, w.duration, rss_margin)
    peaks = _cache_peaks(samples)
    largest = max((s["largest_entry"] for s in samples), default=0)
    errors = [(r["agent"], r["turn"], r["status"], r.get("error")) for r in results if r["status"] != 200]
    checks = {
        "memory_within_budget_plus_one_entry": peaks["memory"] <= memory_budget + largest,
        "disk_within_budget": peaks["disk"] <= disk_budget,
        "rss_flat": rss_flat,
        "p95_last_within_1_5x_first": p95_first is not None and p95_last is not None and p95_last <= 1.5 * p95_first,
        "no_errors": not errors,
        "disk_tier_used": peaks["disk"] > 0,
    }
    hits = sum(1 for r in results if r["cached"])
    return {"duration_s": w.duration, "requests": len(results), "requests_with_cached_tokens": hits,
            "windows_s": {"warmup": w.warmup, "length": w.length}, **windows, "rss_mb": rss,
            "cache_peak_bytes": peaks, "budgets": {"memory": memory_budget, "disk": disk_budget},
            "largest_memory_entry": largest, "errors": errors[:20], "samples_every_2s": samples[::4],
            "checks": checks,
            "results": [{k: r[k] for k in ("start", "seconds", "status", "stream", "turn", "cached")} for r in results]}


def _windows(results: list[dict], samples: list[dict], w: Windows) -> dict:
    """Latency (p50, p95) and mean step time in the first window after warm-up and in the last."""
    first = [r["seconds"] for r in results if w.first(r["start"])]
    last = [r["seconds"] for r in results if w.last(r["start"])]
    p95_first, p95_last = percentiles(first).get("p95"), percentiles(last).get("p95")
    return {"p95_first_window_s": p95_first, "p95_last_window_s": p95_last,
            "p95_last_over_first": p95_last / p95_first if p95_first and p95_last else None,
            "p50_first_last_window_s": [percentiles(first).get("p50"), percentiles(last).get("p50")],
            "mean_step_first_last_window_s": [_mean_step([s for s in samples if w.first(s["t"])]),
                                              _mean_step([s for s in samples if w.last(s["t"])])]}


def _rss(samples: list[dict], duration: float, margin: float) -> tuple[dict, bool]:
    """RSS peaks per third of the run and its slope after the first third; and whether it is flat:
    the last third's peak within `margin` of the middle third's."""
    thirds = [[s["rss_mb"] for s in samples if k * duration / 3 <= s["t"] < (k + 1) * duration / 3]
              for k in range(3)]
    middle, last = max(thirds[1], default=0.0), max(thirds[2], default=0.0)
    slope = _slope([(s["t"] / 60, s["rss_mb"]) for s in samples if s["t"] >= duration / 3])
    return ({"first_third_max": max(thirds[0], default=0.0), "middle_third_max": middle, "last_third_max": last,
             "margin": margin, "slope_per_min_after_first_third": slope},
            bool(thirds[1]) and last <= middle * (1 + margin))


def _cache_peaks(samples: list[dict]) -> dict:
    """The largest stored bytes per cache tier seen, and of memory plus writing together."""
    peaks = {tier: max((s[tier] for s in samples), default=0) for tier in ("memory", "disk", "writing")}
    return peaks | {"memory_plus_writing": max((s["memory"] + s["writing"] for s in samples), default=0)}


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
