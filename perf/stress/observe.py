"""What the daemon says about itself while a workload runs: /metrics, health, whether it answers."""

from __future__ import annotations

import json
import time

import aiohttp

from perf.common import parse_metrics
from perf.stress.conversations import Agent, turn


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
