"""What 8-bit / 4-bit KV on disk (cache_disk_encoding) does to answers, on the embedded model.

For each prompt: a cold greedy answer; then the prompt's KV is stored, encoded (native, int8, int4),
decoded as a load from disk would, and the same prompt continues from it. Reports how many answers
stay token-identical and where the others first diverge.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from perf.common import QUESTIONS, machine_info, system_prompt

ENCODINGS = ("native", "int8", "int4")


def greedy(batcher, seq_id: int, prompt: list[int], steps: int, prefix=None) -> list[int]:
    from semcache.engine.batch import Admission
    from semcache.scheduler.sequence import SamplingParams

    admit = [Admission(seq_id, prompt, SamplingParams(temperature=0.0), prefix=prefix)]
    out: list[int] = []
    while len(out) < steps:
        out += batcher.step(admit, []).tokens.values()
        admit = []
    return out


def configure(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("perf-quant.json"))
    parser.add_argument("--prompts", type=int, default=10)


def main(args) -> dict:
    return run(args.out, prompts=args.prompts)


def run(out: Path, prompts: int = 10, steps: int = 32) -> dict:
    import numpy as np

    import semcache  # noqa: F401  (OpenBLAS first)
    from semcache.engine.batch import Batcher
    from semcache.text.chat import ChatMessage, PromptRenderer
    from semcache.cache.kvdata import KVData
    from semcache.engine.models import load_model

    loaded = load_model(None)
    batcher = Batcher(loaded.model, 256)
    render = PromptRenderer(loaded.tokenizer).render
    results = {e: [] for e in ENCODINGS}
    for i in range(prompts):
        ids = render([ChatMessage("system", system_prompt(i, sentences=18)),
                      ChatMessage("user", QUESTIONS[i % len(QUESTIONS)])])
        cold = greedy(batcher, 1, ids, steps)
        kept = batcher.step([], [1], keep=[1]).kept[1]  # KV of the prompt and the answer so far
        tokens = np.asarray(ids + cold[:-1], dtype=np.int32)
        for encoding in ENCODINGS:
            _, loaded_kv = KVData.from_tensors(kept.to_tensors(tokens, encoding), kept.dtype, encoding)
            warm = greedy(batcher, 2, ids, steps, prefix=loaded_kv.prefix(len(ids) - 1))
            batcher.step([], [2])
            same = next((j for j, (a, b) in enumerate(zip(cold, warm)) if a != b), steps)
            results[encoding].append(same)
            print(f"  prompt {i} ({len(ids)} tokens) {encoding}: identical for {same}/{steps} tokens", flush=True)
    summary = {e: {"identical_answers": sum(1 for s in v if s == steps), "prompts": prompts,
                   "median_first_divergence": statistics.median(v), "min_first_divergence": min(v)}
               for e, v in results.items()}
    report = {"benchmark": "quant", "machine": machine_info(), "steps": steps, "summary": summary,
              "first_divergence": results}
    out.write_text(json.dumps(report, indent=2))
    return report
