"""Speculative decoding benchmark: prompt-lookup speculation off vs on, on the embedded model, greedy.

Two daemons (SEMCACHE_SPECULATIVE=off and =prompt_lookup, agent cache off so every turn prefills
alike) answer the same turns (perf/spec_workloads.py: copy-heavy and free, ~600-token contexts),
alone (decode tok/s: tokens after the first over first-to-last token time, summed over the turns)
and 8 at once (aggregate tok/s over the wall time), alternating off and on within every round.
The report compares medians over the rounds, checks every greedy answer is identical, and gives
each workload's acceptance (accepted / drafted tokens) and mean accepted tokens per verify step from
the daemon's own metrics.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from perf import client, servers
from perf.common import machine_info, read_metrics, rounded
from perf.spec_workloads import copy_heavy, free

WORKLOADS = {"copy_heavy": copy_heavy, "free": free}
MODES = {"off": "off", "on": "prompt_lookup"}
_DRAFTED, _ACCEPTED = "semcache_speculative_drafted_tokens_total", "semcache_speculative_accepted_tokens_total"
_STEPS = "semcache_speculative_accepted_per_step_count"


def configure(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("perf-spec.json"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrent", type=int, default=8)


def main(args) -> dict:
    return run(args.out, args.runs, args.max_tokens, args.concurrent)


async def _alone(base: str, prompts: list[str], max_tokens: int) -> dict:
    async with client.session() as http:
        results = [await client.stream_chat(http, base, client.user(p), max_tokens) for p in prompts]
    tokens = sum(r["tokens"] - 1 for r in results)
    return {"tok_s": tokens / sum(r["decode_seconds"] for r in results), "texts": [r["text"] for r in results]}


async def _together(base: str, prompts: list[str], n: int, max_tokens: int) -> dict:
    async with client.session() as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(client.stream_chat(http, base, client.user(prompts[i % len(prompts)]),
                                                            max_tokens) for i in range(n)))
        wall = time.perf_counter() - start
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "texts": [r["text"] for r in results]}


def _drafts(base: str) -> tuple[float, float, float]:
    m = read_metrics(base)
    return m.get(_DRAFTED, 0.0), m.get(_ACCEPTED, 0.0), m.get(_STEPS, 0.0)


def run(out: Path, runs: int = 5, max_tokens: int = 128, concurrent: int = 8) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="semcache-perf-spec-"))
    report: dict = {"benchmark": "spec", "machine": machine_info(),
                    "params": {"runs": runs, "max_tokens": max_tokens, "concurrent": concurrent}, "rounds": []}
    env = {"SEMCACHE_CACHE_ENABLED": "false"}
    with servers.daemon(workdir, "off", {**env, "SEMCACHE_SPECULATIVE": "off"}) as off, \
            servers.daemon(workdir, "on", {**env, "SEMCACHE_SPECULATIVE": "prompt_lookup"}) as on:
        daemons = {"off": off, "on": on}
        for d in daemons.values():  # warm-up
            asyncio.run(_alone(d.base, ["Say hello."], 8))
        drafts = {w: [0.0, 0.0, 0.0] for w in WORKLOADS}
        mismatches: list[str] = []
        for r in range(runs):
            rnd: dict = {}
            for w, make in WORKLOADS.items():
                prompts = make(salt=r)
                for shape in ("alone", "together"):
                    texts = {}
                    for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                        base = daemons[mode].base
                        before = _drafts(base)
                        if shape == "alone":
                            res = asyncio.run(_alone(base, prompts, max_tokens))
                        else:
                            res = asyncio.run(_together(base, prompts, concurrent, max_tokens))
                        if mode == "on":
                            drafts[w] = [t + a - b for t, a, b in zip(drafts[w], _drafts(base), before)]
                        texts[mode] = res.pop("texts")
                        rnd[f"{w}/{shape}/{mode}"] = res["tok_s"]
                    if texts["off"] != texts["on"]:
                        mismatches.append(f"round {r + 1} {w}/{shape}")
                    rnd[f"{w}/{shape}/ratio"] = rnd[f"{w}/{shape}/on"] / rnd[f"{w}/{shape}/off"]
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in rnd.items()), flush=True)
            report["rounds"].append(rnd)
    keys = report["rounds"][0].keys()
    medians = {k: statistics.median(rnd[k] for rnd in report["rounds"]) for k in keys}
    acceptance = {w: {"drafted": d, "accepted": a, "acceptance_rate": a / d if d else None,
                      "mean_accepted_per_verify_step": a / s if s else None}
                  for w, (d, a, s) in drafts.items()}
    report["summary"] = rounded({"median": medians, "acceptance": acceptance,
                                 "identical_greedy_output": not mismatches, "mismatches": mismatches})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report
