"""Agent bursts: many agents at once, each sending its turns back to back with no pause; whether
every turn is served and every later turn reuses the agent's cache."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from perf.common import percentiles
from perf.stress.conversations import Agent, turn


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
