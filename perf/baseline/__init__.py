"""Baseline report: one JSON with everything a first look at a machine needs.

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
import dataclasses
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from perf import agents, servers
from perf.baseline.params import FULL, QUICK, Params
from perf.baseline.summary import ratios, summarize
from perf.baseline.workloads import first_requests, measure_targets
from perf.common import machine_info, rss_mb


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
    cmd = servers.semcache_cmd(port, cache_dir)
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
    for secret in ("api_keys", "api_keys_file", "admin_key", "metrics_key"):
        config[secret] = "(set)" if config.get(secret) else config.get(secret)
    return config
