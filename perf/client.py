"""Load-generating client: streamed OpenAI chat requests with per-token timing, health probes."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from perf.common import PROMPTS, percentiles, sse_events

# mlx_lm.server loads whatever "model" names unless it is "default_model"; semcache accepts any name.
MODEL_NAME = "default_model"


async def stream_chat(session: aiohttp.ClientSession, base: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion at temperature 0; times of first and last token, token count."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    chunks = 0
    tokens = None
    async with session.post(f"{base}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            await r.read()
            return {"status": r.status, "total": time.perf_counter() - start}
        async for data in sse_events(r):
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or ():
                if choice["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
    end = time.perf_counter()
    tokens = tokens if tokens is not None else chunks
    return {"status": 200, "ttft": (first or end) - start, "total": end - start, "tokens": tokens,
            "decode_seconds": (last or end) - (first or end)}


async def run_concurrent(base: str, n: int, max_tokens: int, probe_path: str | None = None, salt: str = "") -> dict:
    """n requests at once; aggregate output tok/s, latency percentiles, optional health probes every 20 ms."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        probes: list[float] = []
        done = asyncio.Event()
        prober = asyncio.create_task(_probe(session, base, probe_path, probes, done)) if probe_path else None
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_chat(session, base, PROMPTS[i % len(PROMPTS)] + salt, max_tokens)
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
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        start = time.perf_counter()
        results = [await stream_chat(session, base, PROMPTS[i % len(PROMPTS)] + salt, max_tokens) for i in range(n)]
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
