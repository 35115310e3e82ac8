"""Greedy chat requests in both dialects (OpenAI and Anthropic) and agents whose conversations grow
by one question and answer per turn."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp

from perf.common import SHORT_QUESTIONS, parse_reply, short_system_prompt

ANTHROPIC = {"anthropic-version": "2023-06-01"}


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
