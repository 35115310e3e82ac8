"""Baseline report (issue 5 §1): one JSON with everything a first look at a machine needs.

python -m perf baseline --out report.json [--quick] [--compare URL] [--plot turns.png]

Starts a daemon on the embedded model with a temporary cache folder and measures: cold start to
ready, the first requests, one agent's growing conversation (TTFT and cached tokens per turn),
/health/ready latency idle and under 100 probes in flight, TTFT / inter-token latency / tok/s at
1, 4 and 16 concurrent requests, then the multi-agent and restart part of the agent cache benchmark
(perf.agents.run_agents). With --compare URL the OpenAI-protocol parts also run against that server
(e.g. mlx_lm.server on the same weights), alternating targets within each round, and the report
gains semcache/peer ratios: with other load on the machine, only ratios measured side by side mean much.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import itertools
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from perf import agents, client, servers
from perf.common import (PROMPTS, QUESTIONS, machine_info, percentiles, rounded, rss_mb, sse_events,
                         system_prompt)


@dataclasses.dataclass(frozen=True)
class Params:
    quick: bool
    max_tokens: int  # output tokens per request of the concurrency workloads
    concurrency: tuple[int, ...]
    rounds: int  # rounds of the concurrency workloads; targets alternate within each round
    turns: int  # turns of the one-agent conversation
    system_sentences: int  # its system prompt (perf.common.system_prompt): 37 sentences ≈ 1,000 tokens
    agent_max_tokens: int  # output tokens per turn, one agent and multi-agent alike
    health_probes: int  # sequential probes on the idle daemon
    health_bursts: int  # bursts of `burst_size` probes in flight at once
    burst_size: int
    health_timeout_s: float  # a probe unanswered this long counts as a timeout
    agents: int  # multi-agent part: agents taking 3 turns, restart, 1 more turn
    agent_budget: str  # its cache_memory_budget (must not hold every agent)


FULL = Params(quick=False, max_tokens=64, concurrency=(1, 4, 16), rounds=3, turns=8, system_sentences=37,
              agent_max_tokens=32, health_probes=200, health_bursts=5, burst_size=100, health_timeout_s=30.0,
              agents=12, agent_budget="256MiB")
# Quick: ~1,000-token prompts still (their prefill is what the cache saves), fewer of everything else;
# a 64 MiB budget holds one agent's entry, so the second one's turns come from disk.
QUICK = dataclasses.replace(FULL, quick=True, max_tokens=16, rounds=1, turns=4, agent_max_tokens=16,
                            health_probes=100, health_bursts=3, agents=2, agent_budget="64MiB")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("perf-baseline.json"))
    parser.add_argument("--quick", action="store_true", help="reduced version (under 3 minutes on 2 cores)")
    parser.add_argument("--compare", metavar="URL", help="also run the OpenAI-protocol workloads against this "
                        "server (e.g. mlx_lm.server on the same weights) and add semcache/peer ratios")
    parser.add_argument("--compare-health", default="/health", metavar="PATH",
                        help="health path of the --compare server (default /health, as mlx_lm.server)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw TTFT per turn (needs matplotlib)")


def main(args: argparse.Namespace) -> dict:
    if args.plot:
        from perf import plot

        plot.require()  # fail now, not after a 10-minute run
    params = QUICK if args.quick else FULL
    return run(args.out, params, compare=args.compare, compare_health=args.compare_health, plot_path=args.plot)


def run(out: Path, params: Params, compare: str | None = None, compare_health: str = "/health",
        plot_path: Path | None = None) -> dict:
    """Measure everything, write the JSON report to `out` (and the PNG to `plot_path`), return it."""
    started = time.perf_counter()
    run_id = uuid.uuid4().hex[:8]  # in every prompt: a long-running peer has not seen them before
    report: dict = {"benchmark": "baseline", "machine": {**machine_info(), "load_average_at_start": os.getloadavg()},
                    "params": {**dataclasses.asdict(params), "compare": compare, "compare_health": compare_health,
                               "run_id": run_id},
                    "source": source()}
    with tempfile.TemporaryDirectory(prefix="semcache-perf-baseline-") as tmp:
        try:
            measure_semcache(report, params, Path(tmp), compare, compare_health)
        except BaseException:
            _print_logs(Path(tmp))  # the folder goes away with the daemons' logs: show their ends
            raise
    if compare:
        report["ratios"] = ratios(report["targets"]["semcache"], report["targets"]["peer"])
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - started
    report["summary"] = summarize(report)
    out.write_text(json.dumps(report, indent=2))
    if plot_path:
        from perf import plot

        plot.plot_turns(report, plot_path)
    return report


def measure_semcache(report: dict, params: Params, workdir: Path, compare: str | None, compare_health: str):
    """Fill the report's startup, first_requests, targets and multi_agent sections."""
    run_id = report["params"]["run_id"]
    port, cache_dir = servers.free_port(), workdir / "baseline-cache"  # run_agents uses workdir/cache
    report["config"] = daemon_config(cache_dir, port)
    cmd = servers.semcache_cmd(port) + ["--cache-dir", str(cache_dir)]
    print("semcache: cold start", flush=True)
    with servers.running(cmd, "/health/ready", port, workdir / "semcache.log") as (base, pid, ready):
        report["startup"] = {"seconds_to_ready": ready, "rss_mb_at_ready": rss_mb(pid)}
        report["first_requests"] = asyncio.run(first_requests(base, params.max_tokens, run_id))
        targets = {"semcache": (base, "/health/ready")}
        if compare:
            targets["peer"] = (compare.rstrip("/"), compare_health)
        start = time.perf_counter()
        report["targets"] = measure_targets(targets, params, run_id)
        report["startup"]["rss_mb_at_end"] = rss_mb(pid)
        report["seconds_openai_workloads"] = time.perf_counter() - start
    print(f"multi-agent: {params.agents} agents, 3 turns, restart, 1 more turn", flush=True)
    start = time.perf_counter()
    report["multi_agent"] = agents.run_agents(workdir, params.agents, params.agent_max_tokens, params.agent_budget)
    report["seconds_multi_agent"] = time.perf_counter() - start


def _print_logs(workdir: Path, lines: int = 15) -> None:
    for log in sorted(workdir.glob("*.log")):
        print(f"--- last {lines} lines of {log.name}", *log.read_text().splitlines()[-lines:], sep="\n", flush=True)


def source() -> dict:
    """The git commit of the semcache being measured, and whether its folder has uncommitted changes."""
    import subprocess

    import semcache

    folder = Path(semcache.__file__).parent

    def git(*argv: str) -> str | None:
        done = subprocess.run(["git", "-C", str(folder), *argv], check=False, capture_output=True,
                              text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"path": str(folder), "commit": commit, "dirty": bool(git("status", "--porcelain", "--", ".")) if commit
            else None}


def daemon_config(cache_dir: Path, port: int) -> dict:
    """The effective config of the daemon about to start (it inherits this environment); secrets left out."""
    import msgspec

    from semcache.ops.config import load_config

    config = msgspec.to_builtins(load_config(overrides={"cache_dir": str(cache_dir), "port": port}))
    for secret in ("api_keys", "api_keys_file", "admin_key"):
        config[secret] = "(set)" if config.get(secret) else config.get(secret)
    return config


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


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=900))


async def stream(session: aiohttp.ClientSession, base: str, messages: list[dict], max_tokens: int,
                 headers: dict | None = None) -> dict:
    """One streamed OpenAI chat completion at temperature 0, timing every content chunk (TTFT, ITL) and
    reading usage. (perf.client.stream_chat times only the first and last chunk, of a one-message prompt.)"""
    body = {"model": client.MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, text, usage = [], [], {}
    async with session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as response:
        if response.status != 200:
            return {"status": response.status, "error": (await response.text())[:500]}
        async for data in sse_events(response):
            usage = data.get("usage") or usage
            pieces = [c["delta"].get("content") for c in data.get("choices") or ()]
            if any(pieces):
                times.append(time.perf_counter())
                text.extend(p for p in pieces if p)
    end = time.perf_counter()
    return {"status": 200, "ttft": (times[0] if times else end) - start, "total": end - start,
            "gaps": [b - a for a, b in itertools.pairwise(times)], "text": "".join(text),
            "tokens": usage.get("completion_tokens", len(times)), "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def ms(seconds: list[float]) -> dict:
    """p50, p95 and max in milliseconds ({} for no values)."""
    p = percentiles([s * 1000 for s in seconds], (50, 95, 100))
    return {"p50": p["p50"], "p95": p["p95"], "max": p["p100"]} if p else {}


async def first_requests(base: str, max_tokens: int, run_id: str) -> list[dict]:
    """The first two requests a fresh daemon serves (different prompts): what a first user waits."""
    async with _session() as session:
        results = [await stream(session, base, _user(f"[{run_id}] {PROMPTS[i]}"), max_tokens) for i in (0, 1)]
    assert all(r["status"] == 200 for r in results), results
    return [{"ttft_ms": r["ttft"] * 1000, "total_ms": r["total"] * 1000, "tokens": r["tokens"]} for r in results]


async def agent_series(base: str, params: Params, agent_id: str, salt: str) -> dict:
    """One agent (X-Agent-ID) takes `turns` turns of a growing conversation: TTFT and cached tokens per turn."""
    messages = [{"role": "system", "content": system_prompt(0, salt, params.system_sentences)}]
    rows = []
    async with _session() as session:
        for t in range(1, params.turns + 1):
            messages.append({"role": "user", "content": QUESTIONS[(t - 1) % len(QUESTIONS)]})
            r = await stream(session, base, messages, params.agent_max_tokens, {"X-Agent-ID": agent_id})
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

    async with _session() as session:
        alone = [await probe(session) for _ in range(params.health_probes)]
        crowd = [p for _ in range(params.health_bursts)
                 for p in await asyncio.gather(*(probe(session) for _ in range(params.burst_size)))]
    return {"alone_ms": ms([s for _, s in alone]), "alone_probes": len(alone),
            f"concurrent_{params.burst_size}_ms": ms([s for _, s in crowd]), "concurrent_probes": len(crowd),
            "statuses": dict(collections.Counter(status for status, _ in alone + crowd))}


async def burst(base: str, n: int, max_tokens: int, salt: str) -> dict:
    """n streamed requests at once; the salt leads each prompt, so no earlier request's cache serves it."""
    async with _session() as session:
        start = time.perf_counter()
        prompts = [f"{salt} {PROMPTS[i % len(PROMPTS)]}" for i in range(n)]
        results = await asyncio.gather(*(stream(session, base, _user(p), max_tokens) for p in prompts))
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


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(ours: dict, peer: dict) -> dict:
    """semcache / peer for each figure both produced: below 1 is better for latencies, above 1 for tok/s."""
    out = {}
    for key in (k for k in ours if k.startswith("concurrent_")):
        a, b = ours[key], peer[key]
        out[key] = {"ttft_p50": _ratio(a["ttft_ms"].get("p50"), b["ttft_ms"].get("p50")),
                    "itl_p50": _ratio(a["itl_ms"].get("p50"), b["itl_ms"].get("p50")),
                    "tok_s": _ratio(a["tok_s"], b["tok_s"])}
    for key in (k for k in ours["health"] if k.endswith("_ms")):
        out[f"health_{key}"] = {p: _ratio(ours["health"][key].get(p), peer["health"][key].get(p))
                                for p in ("p50", "p95", "max")}
    a, b = ours["agent_series"], peer["agent_series"]
    out["agent_turn1_ttft"] = _ratio(a["turn1_ttft_ms"], b["turn1_ttft_ms"])
    out["agent_median_later_ttft"] = _ratio(a["median_later_ttft_ms"], b["median_later_ttft_ms"])
    return out


def summarize(report: dict) -> dict:
    ours = report["targets"]["semcache"]
    series, health_ = ours["agent_series"], ours["health"]
    multi = report["multi_agent"]
    summary = {
        "quick": report["params"]["quick"], "wall_seconds": round(report["wall_seconds"], 1),
        "seconds_to_ready": round(report["startup"]["seconds_to_ready"], 2),
        "first_request_ttft_ms": round(report["first_requests"][0]["ttft_ms"], 1),
        "agent_turn1_ttft_ms": round(series["turn1_ttft_ms"], 1),
        "agent_median_later_ttft_ms": rounded(series["median_later_ttft_ms"], 1),
        "agent_turn1_over_later": rounded(series["turn1_over_median_later"], 2),
        "agent_cached_tokens_per_turn": [row["cached_tokens"] for row in series["turns"]],
        "health_ms": {k: {p: round(v, 2) for p, v in health_[k].items()} for k in health_ if k.endswith("_ms")},
        "multi_agent_warm_over_cold_ttft": round(multi["warm_over_cold"], 4),
        "multi_agent_restart_over_cold_ttft": round(multi["restart_over_cold"], 4),
        "seconds_to_ready_after_restart": round(multi["seconds_to_ready_after_restart"], 2),
    }
    for key in (k for k in ours if k.startswith("concurrent_")):
        c = ours[key]
        summary[key] = {"ttft_p50_ms": rounded(c["ttft_ms"].get("p50"), 1), "itl_p50_ms": rounded(c["itl_ms"].get("p50"), 1),
                        "itl_p95_ms": rounded(c["itl_ms"].get("p95"), 1), "tok_s": round(c["tok_s"], 1)}
    if "ratios" in report:
        summary["semcache_over_peer"] = rounded(report["ratios"], 3)
    return summary

