"""The baseline's OpenAI-protocol workloads, run on each target: the first requests, one agent's
growing conversation, health latency, and bursts of concurrent streamed requests."""

from __future__ import annotations

import asyncio
import collections
import statistics
import time

import aiohttp

from perf import client
from perf.baseline.params import Params
from perf.common import PROMPTS, QUESTIONS, percentiles, system_prompt


def measure_targets(targets: dict[str, tuple[str, str]], params: Params, run_id: str) -> dict:
    """The OpenAI-protocol workloads on each target; concurrency rounds alternate targets (ABAB...)."""
    out: dict[str, dict] = {}
    for name, (base, health_path) in targets.items():
        print(f"{name}: one agent, {params.turns} turns", flush=True)
        series = asyncio.run(agent_series(base, params, f"baseline-{run_id}-{name}", f"[{run_id}] "))
        print(f"{name}: health {health_path}", flush=True)
        out[name] = {"url": base, "agent_series": series,
                     "health": asyncio.run(health(base + health_path, params))}
    bursts: dict[tuple[str, int], list[dict]] = {(name, n): [] for name in targets for n in params.concurrency}
    for r in range(params.rounds):
        for n in params.concurrency:
            for name, (base, _) in targets.items():
                result = asyncio.run(burst(base, n, params.max_tokens, f"[{run_id} round {r} n {n}]"))
                bursts[name, n].append(result)
                print(f"round {r + 1} {name} c{n}: {result['tok_s']:.1f} tok/s", flush=True)
    for (name, n), results in bursts.items():
        out[name][f"concurrent_{n}"] = pooled(results, n)
    return out


def ms(seconds: list[float]) -> dict:
    """p50, p95 and max in milliseconds ({} for no values)."""
    p = percentiles([s * 1000 for s in seconds], (50, 95, 100))
    return {"p50": p["p50"], "p95": p["p95"], "max": p["p100"]} if p else {}


async def first_requests(base: str, max_tokens: int, run_id: str) -> list[dict]:
    """The first two requests a fresh daemon serves (different prompts): what a first user waits."""
    async with client.session() as session:
        results = [await client.stream_chat(session, base, client.user(f"[{run_id}] {PROMPTS[i]}"), max_tokens)
                   for i in (0, 1)]
    assert all(r["status"] == 200 for r in results), results
    return [{"ttft_ms": r["ttft"] * 1000, "total_ms": r["total"] * 1000, "tokens": r["tokens"]} for r in results]


async def agent_series(base: str, params: Params, agent_id: str, salt: str) -> dict:
    """One agent (X-Agent-ID) takes `turns` turns of a growing conversation: TTFT and cached tokens per turn."""
    messages = [{"role": "system", "content": system_prompt(0, salt, params.system_sentences)}]
    rows = []
    async with client.session() as session:
        for t in range(1, params.turns + 1):
            messages.append({"role": "user", "content": QUESTIONS[(t - 1) % len(QUESTIONS)]})
            r = await client.stream_chat(session, base, messages, params.agent_max_tokens, {"X-Agent-ID": agent_id})
            assert r["status"] == 200, r
            messages.append({"role": "assistant", "content": r["text"].strip() or "."})
            rows.append({"turn": t, "ttft_ms": r["ttft"] * 1000, "total_ms": r["total"] * 1000,
                         "prompt_tokens": r["prompt_tokens"], "cached_tokens": r["cached_tokens"]})
            print(f"  turn {t}: ttft {r['ttft'] * 1000:.0f} ms, cached {r['cached_tokens']}/{r['prompt_tokens']}",
                  flush=True)
    later = statistics.median(row["ttft_ms"] for row in rows[1:]) if len(rows) > 1 else None
    return {"agent_id": agent_id, "turns": rows, "turn1_ttft_ms": rows[0]["ttft_ms"], "median_later_ttft_ms": later,
            "turn1_over_median_later": rows[0]["ttft_ms"] / later if later else None}


async def health(url: str, params: Params) -> dict:
    """Health latency: sequential probes on the idle server, then bursts of `burst_size` probes at once.

    A probe unanswered after `health_timeout_s` counts as that long (a lower bound) with status "timeout":
    a server with a short listen backlog drops connections, and SYN retries back off for minutes."""
    timeout = aiohttp.ClientTimeout(total=params.health_timeout_s)

    async def probe(session: aiohttp.ClientSession) -> tuple[str, float]:
        start = time.perf_counter()
        try:
            async with session.get(url, timeout=timeout) as response:
                await response.read()
        except TimeoutError:
            return "timeout", params.health_timeout_s
        return str(response.status), time.perf_counter() - start

    async with client.session() as session:
        alone = [await probe(session) for _ in range(params.health_probes)]
        crowd = [p for _ in range(params.health_bursts)
                 for p in await asyncio.gather(*(probe(session) for _ in range(params.burst_size)))]
    return {"alone_ms": ms([s for _, s in alone]), "alone_probes": len(alone),
            f"concurrent_{params.burst_size}_ms": ms([s for _, s in crowd]), "concurrent_probes": len(crowd),
            "statuses": dict(collections.Counter(status for status, _ in alone + crowd))}


async def burst(base: str, n: int, max_tokens: int, salt: str) -> dict:
    """n streamed requests at once; the salt leads each prompt, so no earlier request's cache serves it."""
    async with client.session() as session:
        start = time.perf_counter()
        prompts = [f"{salt} {PROMPTS[i % len(PROMPTS)]}" for i in range(n)]
        results = await asyncio.gather(*(client.stream_chat(session, base, client.user(p), max_tokens)
                                         for p in prompts))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    return {"wall_s": wall, "results": results, "tok_s": sum(r["tokens"] for r in ok) / wall}


def pooled(bursts: list[dict], n: int) -> dict:
    """Percentiles over every request of every round; tok/s as the median round."""
    results = [r for b in bursts for r in b["results"]]
    ok = [r for r in results if r["status"] == 200]
    return {"n": n, "rounds": len(bursts), "requests": len(results), "num_ok": len(ok),
            "statuses": sorted({r["status"] for r in results}),
            "ttft_ms": ms([r["ttft"] for r in ok]), "itl_ms": ms([g for r in ok for g in r["gaps"]]),
            "tok_s": statistics.median(b["tok_s"] for b in bursts), "tok_s_per_round": [b["tok_s"] for b in bursts],
            "median_output_tokens": statistics.median(r["tokens"] for r in ok) if ok else 0}
