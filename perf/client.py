"""Load-generating client: streamed OpenAI chat requests with per-chunk timing, bursts of them, health probes."""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp

from perf.common import PROMPTS, percentiles, sse_events

# mlx_lm.server loads whatever "model" names unless it is "default_model"; semcache accepts any name.
MODEL_NAME = "default_model"


def session() -> aiohttp.ClientSession:
    """A client session with no limit on connections and 15 minutes for a whole request."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=900))


def user(content: str) -> list[dict]:
    """The messages of a one-turn conversation."""
    return [{"role": "user", "content": content}]


async def stream_chat(session: aiohttp.ClientSession, base: str, messages: list[dict], max_tokens: int,
                      headers: dict | None = None) -> dict:
    """One streamed chat completion at temperature 0, timing every content chunk: time to the first
    (ttft), gaps between them (inter-token latency), from the first to the last (decode_seconds);
    the text and the usage it reports."""
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, text, usage = [], [], {}
    async with session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status != 200:
            error = (await r.text())[:500]
            return {"status": r.status, "total": time.perf_counter() - start, "error": error}
        async for data in sse_events(r):
            usage = data.get("usage") or usage
            pieces = [c["delta"].get("content") for c in data.get("choices") or ()]
            if any(pieces):
                times.append(time.perf_counter())
                text.extend(p for p in pieces if p)
    end = time.perf_counter()
    first, last = (times[0], times[-1]) if times else (end, end)
    return {"status": 200, "ttft": first - start, "total": end - start, "decode_seconds": last - first,
            "gaps": [b - a for a, b in itertools.pairwise(times)], "text": "".join(text),
            "tokens": usage.get("completion_tokens", len(times)), "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


async def run_concurrent(base: str, n: int, max_tokens: int, probe_path: str | None = None, salt: str = "") -> dict:
    """n requests at once; aggregate output tok/s, latency percentiles, optional health probes every 20 ms."""
    async with session() as http:
        probes: list[float] = []
        done = asyncio.Event()
        prober = asyncio.create_task(_probe(http, base, probe_path, probes, done)) if probe_path else None
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_chat(http, base, user(PROMPTS[i % len(PROMPTS)] + salt), max_tokens)
                                         for i in range(n)))
        wall = time.perf_counter() - start
        done.set()
        if prober:
            await prober
    ok = [r for r in results if r["status"] == 200]
    out = {
        "n": n, "max_tokens": max_tokens, "wall_seconds": wall,
        "statuses": sorted({r["status"] for r in results}),
        "num_ok": len(ok),
        "output_tokens": sum(r["tokens"] for r in ok),
        "aggregate_tok_s": sum(r["tokens"] for r in ok) / wall,
        "ttft": percentiles([r["ttft"] for r in ok]),
        "latency": percentiles([r["total"] for r in ok]),
    }
    if probe_path:
        out["health_ms"] = percentiles([p * 1000 for p in probes], (50, 95, 99, 100))
        out["health_probes"] = len(probes)
    return out


async def run_sequential(base: str, n: int, max_tokens: int, salt: str = "") -> dict:
    """n requests one after another; aggregate output tok/s over the whole run."""
    async with session() as http:
        start = time.perf_counter()
        results = [await stream_chat(http, base, user(PROMPTS[i % len(PROMPTS)] + salt), max_tokens) for i in range(n)]
        wall = time.perf_counter() - start
    single = results[0]
    return {
        "n": n, "wall_seconds": wall,
        "output_tokens": sum(r["tokens"] for r in results),
        "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
        "single_decode_tok_s": (single["tokens"] - 1) / single["decode_seconds"],
        "ttft": percentiles([r["ttft"] for r in results]),
        "latency": percentiles([r["total"] for r in results]),
    }


async def _probe(session, base, path, probes, done):
    while not done.is_set():
        t = time.perf_counter()
        async with session.get(base + path) as r:
            await r.read()
        probes.append(time.perf_counter() - t)
        await asyncio.sleep(0.02)
