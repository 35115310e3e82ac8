"""Bounded loopback stress: overload, agent bursts, sustained load and disconnect storms against a
daemon on the embedded model.

One implementation for `python -m perf stress` and tests/test_stress.py: each workload (a module
of this package) takes a daemon's base URL, runs for a bounded time, and returns its measurements
plus `checks`, a dict of named pass/fail verdicts (the tests assert them; the perf report records
them). This module is the command line: one fresh daemon per workload, one JSON report.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

from perf import servers
from perf.common import machine_info, rounded
from perf.stress import bursts, disconnect, overload, sustained

PARTS = ("overload", "agents", "sustained", "disconnect")


def env_for(part: str, args) -> dict[str, str]:
    base = {"SEMCACHE_MAX_QUEUE_WAIT": "600"}
    return base | {
        "overload": {"SEMCACHE_MAX_ACTIVE": str(args.max_active), "SEMCACHE_MAX_QUEUE": str(args.max_queue)},
        "sustained": {"SEMCACHE_CACHE_MEMORY_BUDGET": str(args.memory_budget),
                      "SEMCACHE_CACHE_DISK_BUDGET": str(args.disk_budget)},
    }.get(part, {})


async def run_part(part: str, d: servers.Daemon, args) -> dict:
    if part == "overload":
        return await overload.overload(d.base, args.requests, args.max_active, args.max_queue)
    if part == "agents":
        return await bursts.agent_bursts(d.base, args.agents, args.turns)
    if part == "sustained":
        return await sustained.sustained(d.base, d.pid, args.duration, args.memory_budget, args.disk_budget,
                                         concurrency=args.concurrency, population=args.population)
    return await disconnect.disconnect_storm(d.base)


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
    """The headline numbers of each part, and every check."""
    keys = {"overload": ("statuses", "num_served", "refusal_ms"),
            "agents": ("requests", "wall_s", "latency_s", "cached_tokens_later_turns"),
            "sustained": ("duration_s", "requests", "p95_first_window_s", "p95_last_window_s", "p95_last_over_first",
                          "rss_mb", "cache_peak_bytes", "budgets", "largest_memory_entry"),
            "disconnect": ("idle_after_last_drop_s", "mean_step_s", "probe_queue_wait_s", "gauges_after")}
    return {part: {k: r[k] for k in (*keys[part], "loadavg_before", "loadavg_after")}
            | {"checks": r["checks"], "passed": all(r["checks"].values())} for part, r in parts.items()}
