"""Serving benchmark: decode speed, throughput under concurrency and health latency of semcache,
against a bare mlx-lm loop on the same weights and, with --peer, mlx_lm.server.

Workloads alternate between targets within each round (ABAB...), `runs` rounds, and the report
compares medians: ratios measured side by side, never one absolute time against another.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from perf import client, servers
from perf.common import PROMPTS, machine_info, rss_mb


class BareLoop:
    """A plain mlx-lm generate_step loop on the same weights, in this process (the ceiling to compare)."""

    def __init__(self):
        import semcache  # noqa: F401
        from semcache.text.chat import ChatMessage, PromptRenderer
        from semcache.engine.models import load_model

        self.loaded = load_model(None)
        self.render = lambda p: PromptRenderer(self.loaded.tokenizer).render([ChatMessage("user", p)])

    def decode_tok_s(self, prompt: str, max_tokens: int) -> float:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        times = []
        for _token, _ in generate_step(mx.array(self.render(prompt)), self.loaded.model, max_tokens=max_tokens):
            times.append(time.perf_counter())
        return (len(times) - 1) / (times[-1] - times[0])


def configure(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("perf-serving.json"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-peer", action="store_true", help="skip mlx_lm.server")


def main(args) -> dict:
    return run(args.out, runs=args.runs, max_tokens=args.max_tokens, peer=not args.no_peer)


def run(out: Path, runs: int = 3, max_tokens: int = 64, peer: bool = True, workdir: Path | None = None) -> dict:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="semcache-perf-"))
    log = workdir / "servers.log"
    report: dict = {"benchmark": "serving", "machine": machine_info(),
                    "params": {"runs": runs, "max_tokens": max_tokens, "peer": peer}, "rounds": []}
    bare = BareLoop()
    targets = {}
    with servers.running(servers.semcache_cmd(port := servers.free_port()), "/health/ready", port, log) as sc:
        targets["semcache"] = {"base": sc[0], "pid": sc[1], "health": "/health/ready", "ready_s": sc[2]}
        peer_ctx = None
        if peer:
            model_dir = servers.export_embedded(workdir / "smollm2-mlx")
            pport = servers.free_port()
            peer_ctx = servers.running(servers.peer_cmd(pport, model_dir), "/health", pport, log)
            pr = peer_ctx.__enter__()
            targets["mlx_lm.server"] = {"base": pr[0], "pid": pr[1], "health": "/health", "ready_s": pr[2]}
        try:
            for t in targets.values():
                asyncio.run(client.run_concurrent(t["base"], 1, 8))  # warm-up
                t["rss_after_load_mb"] = rss_mb(t["pid"])
            for r in range(runs):
                rnd = {"bare_decode_tok_s": bare.decode_tok_s(PROMPTS[0], max_tokens)}
                for name, t in targets.items():
                    rnd[name] = round_for(t, max_tokens, salt=f" (Take {r + 1}.)")
                    print(f"round {r + 1} {name}: {summary(rnd[name])}", flush=True)
                print(f"round {r + 1} bare loop decode: {rnd['bare_decode_tok_s']:.1f} tok/s", flush=True)
                report["rounds"].append(rnd)
            s = targets["semcache"]
            report["semcache_64_concurrent"] = asyncio.run(client.run_concurrent(s["base"], 64, 16))
        finally:
            if peer_ctx is not None:
                peer_ctx.__exit__(None, None, None)
    report["targets"] = {k: {kk: v for kk, v in t.items() if kk != "base"} for k, t in targets.items()}
    report["summary"] = compare(report)
    out.write_text(json.dumps(report, indent=2))
    return report


def round_for(target: dict, max_tokens: int, salt: str) -> dict:
    """One round on one target. Each round's prompts differ (salt), so no prompt cache can serve them."""
    base = target["base"]
    seq4 = asyncio.run(client.run_sequential(base, 4, max_tokens, salt))
    c1 = asyncio.run(client.run_concurrent(base, 1, max_tokens, salt=salt))
    c4 = asyncio.run(client.run_concurrent(base, 4, max_tokens, salt=salt))
    c16 = asyncio.run(client.run_concurrent(base, 16, max_tokens, probe_path=target["health"], salt=salt))
    target["rss_at_16_mb"] = max(target.get("rss_at_16_mb", 0), rss_mb(target["pid"]))
    return {"sequential_4": seq4, "concurrent_1": c1, "concurrent_4": c4, "concurrent_16": c16}


def summary(r: dict) -> str:
    return (f"single {r['sequential_4']['single_decode_tok_s']:.1f} tok/s, "
            f"seq4 {r['sequential_4']['aggregate_tok_s']:.1f}, c16 {r['concurrent_16']['aggregate_tok_s']:.1f} tok/s, health p99 "
            f"{r['concurrent_16']['health_ms'].get('p99', float('nan')):.1f} ms")


def compare(report: dict) -> dict:
    med = statistics.median
    rounds = report["rounds"]
    sc = [r["semcache"] for r in rounds]
    out = {
        "bare_decode_tok_s": med([r["bare_decode_tok_s"] for r in rounds]),
        "semcache_single_decode_tok_s": med([r["sequential_4"]["single_decode_tok_s"] for r in sc]),
        "semcache_seq4_tok_s": med([r["sequential_4"]["aggregate_tok_s"] for r in sc]),
        "semcache_c16_tok_s": med([r["concurrent_16"]["aggregate_tok_s"] for r in sc]),
        "semcache_health_p99_ms": med([r["concurrent_16"]["health_ms"]["p99"] for r in sc]),
        "semcache_64_all_200": report["semcache_64_concurrent"]["statuses"] == [200],
    }
    out["single_vs_bare"] = out["semcache_single_decode_tok_s"] / out["bare_decode_tok_s"]
    out["c16_vs_seq4"] = out["semcache_c16_tok_s"] / out["semcache_seq4_tok_s"]
    for n in ("concurrent_1", "concurrent_4", "concurrent_16"):
        out[f"semcache_{n}_ttft_p50_p95"] = [med([r[n]["ttft"][p] for r in sc]) for p in ("p50", "p95")]
        out[f"semcache_{n}_latency_p50_p95"] = [med([r[n]["latency"][p] for r in sc]) for p in ("p50", "p95")]
    if "mlx_lm.server" in rounds[0]:
        pe = [r["mlx_lm.server"] for r in rounds]
        out["peer_c16_tok_s"] = med([r["concurrent_16"]["aggregate_tok_s"] for r in pe])
        out["peer_seq4_tok_s"] = med([r["sequential_4"]["aggregate_tok_s"] for r in pe])
        out["peer_c16_vs_seq4"] = out["peer_c16_tok_s"] / out["peer_seq4_tok_s"]
        out["peer_health_p99_ms"] = med([r["concurrent_16"]["health_ms"]["p99"] for r in pe])
        out["c16_vs_peer"] = out["semcache_c16_tok_s"] / out["peer_c16_tok_s"]
    return out
