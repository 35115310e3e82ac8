"""Speculative decoding benchmark: prompt-lookup speculation off vs on, on the embedded model, greedy.

Two daemons (SEMCACHE_SPECULATIVE=off and =prompt_lookup) answer the same turns
(perf/spec_workloads.py: copy-heavy and free, ~600-token contexts), alternating off and on within
every round:
- alone: one turn at a time; decode tok/s (tokens after the first over first-to-last token time,
  summed over the turns);
- together: 8 turns at once whose context is already in the agent cache, as an agent's next turn
  is (each distinct context was sent once, for one token, before the timed turns); aggregate tok/s
  over the wall time, which is then nearly all decoding;
- together_cold (--cold): the same 8 turns with nothing cached; the wall time then also holds
  8 serialized ~600-token prefills (~2 s each here), which speculation does not touch.
The report compares medians over the rounds, checks every greedy answer is identical, and gives
each workload's acceptance (accepted / drafted tokens) and mean accepted tokens per verify step from
the daemon's own metrics, and the physical ceiling (perf/spec_ceiling.py): what a step feeding each
row w tokens costs against a plain one, for 1 and 8 rows, measured first in this process.
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
from perf.spec_ceiling import measure
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
    parser.add_argument("--cold", action="store_true", help="also 8 at once with nothing cached")


def main(args) -> dict:
    return run(args.out, args.runs, args.max_tokens, args.concurrent, args.cold)


async def _alone(base: str, prompts: list[str], max_tokens: int) -> dict:
    async with client.session() as http:
        results = [await client.stream_chat(http, base, client.user(p), max_tokens) for p in prompts]
    tokens = sum(r["tokens"] - 1 for r in results)
    return {"tok_s": tokens / sum(r["decode_seconds"] for r in results), "texts": [r["text"] for r in results]}


async def _together(base: str, prompts: list[str], n: int, max_tokens: int, warm: bool) -> dict:
    async with client.session() as http:
        if warm:
            for p in prompts:
                await client.stream_chat(http, base, client.user(p), 1)
        start = time.perf_counter()
        results = await asyncio.gather(*(client.stream_chat(http, base, client.user(prompts[i % len(prompts)]),
                                                            max_tokens) for i in range(n)))
        wall = time.perf_counter() - start
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "texts": [r["text"] for r in results]}


def _drafts(base: str) -> tuple[float, float, float]:
    m = read_metrics(base)
    return m.get(_DRAFTED, 0.0), m.get(_ACCEPTED, 0.0), m.get(_STEPS, 0.0)


def run(out: Path, runs: int = 5, max_tokens: int = 128, concurrent: int = 8, cold: bool = False) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="semcache-perf-spec-"))
    report: dict = {"benchmark": "spec", "machine": machine_info(),
                    "params": {"runs": runs, "max_tokens": max_tokens, "concurrent": concurrent, "cold": cold},
              "rounds": []}
    shapes = ("alone", "together", "together_cold") if cold else ("alone", "together")
    report["ceiling"] = measure()
    print("ceiling: " + json.dumps(rounded(report["ceiling"])), flush=True)
    with servers.daemon(workdir, "off", {"SEMCACHE_SPECULATIVE": "off"}) as off, \
            servers.daemon(workdir, "on", {"SEMCACHE_SPECULATIVE": "prompt_lookup"}) as on:
        daemons = {"off": off, "on": on}
        for d in daemons.values():  # warm-up
            asyncio.run(_alone(d.base, ["Say hello."], 8))
        drafts = {w: [0.0, 0.0, 0.0] for w in WORKLOADS}
        mismatches: list[str] = []
        for r in range(runs):
            rnd: dict = {}
            for w, make in WORKLOADS.items():
                prompts = make(salt=r)
                cold_prompts = make(salt=runs + r)  # never sent before: nothing of them is cached
                for shape in shapes:
                    texts = {}
                    for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                        base = daemons[mode].base
                        before = _drafts(base)
                        if shape == "alone":
                            res = asyncio.run(_alone(base, prompts, max_tokens))
                        else:
                            warm = shape == "together"
                            res = asyncio.run(_together(base, prompts if warm else cold_prompts, concurrent,
                                                        max_tokens, warm))
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
