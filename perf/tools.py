"""Constrained decoding cost: what enforcing tool_choice costs per token on this CPU.

1. Grammar libraries on the embedded tokenizer: compile time per request and mask time per token
   while walking a canonical tool call, for llguidance (what semcache uses) and, when installed,
   outlines-core (xgrammar is not measured: it needs torch, triton and transformers).
2. End to end on the embedded model, in-process: greedy decode tok/s of one sequence with a
   tool_choice grammar vs without, alternating runs, same prompt; the ratio is the overhead.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from perf.common import machine_info, median_seconds

SCHEMA = {"type": "object", "properties": {
    "query": {"type": "string"}, "limit": {"type": "integer"},
    "filters": {"type": "object", "properties": {"lang": {"enum": ["en", "fr", "de"]}, "since": {"type": "string"}},
                "required": ["lang"]}}, "required": ["query", "filters"]}
ARGUMENTS = {"query": "weather in Paris", "limit": 5, "filters": {"lang": "en", "since": "2026-01-01"}}


def configure(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("perf-tools.json"))
    parser.add_argument("--runs", type=int, default=5, help="alternating decode runs per setting")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")


def main(args) -> dict:
    report = run(args.runs, args.tokens)
    args.out.write_text(json.dumps(report, indent=2))
    return report


def libraries(tokenizer) -> dict:
    from semcache.text.grammar import Grammars
    from semcache.text.tools import FALLBACK, Tool, ToolCall, ToolChoice, call_text

    tool = Tool("search", "Search the web", SCHEMA)
    target = tokenizer.encode(call_text([ToolCall("x", "search", ARGUMENTS)]), add_special_tokens=False)
    width = len(tokenizer)
    grammars = Grammars(tokenizer, {tokenizer.eos_token_id})
    start = time.perf_counter()
    grammars.compile('start: "x"\n')  # builds the llguidance tokenizer once per model
    out = {"tokenizer_build_s": time.perf_counter() - start}
    out["compile_s"] = median_seconds(lambda: grammars.for_tools(FALLBACK, [tool], ToolChoice("required")), 20)
    masks = []
    constraint = grammars.for_tools(FALLBACK, [tool], ToolChoice("required"))
    for token in target:
        start = time.perf_counter()
        allowed = constraint.allowed(width)
        masks.append(time.perf_counter() - start)
        assert allowed[token] and constraint.advance(token)
    out["mask_us"] = {"p50": statistics.median(masks) * 1e6, "max": max(masks) * 1e6, "tokens": len(target)}
    report = {"llguidance": out}
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        report["outlines_core"] = "not installed"
        return report
    vocab: dict[str, list[int]] = {}
    for piece, i in tokenizer.get_vocab().items():
        if i != tokenizer.eos_token_id:
            vocab.setdefault(piece, []).append(i)
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    vocabulary = Vocabulary(tokenizer.eos_token_id, vocab)
    report["outlines_core"] = {"index_build_s": median_seconds(lambda: Index(regex, vocabulary), 3),
                               "note": "naive vocabulary (byte-level pieces not decoded); per-schema index"}
    guide = Guide(Index(regex, vocabulary))
    lookups = []
    for _ in range(16):
        start = time.perf_counter()
        guide.get_tokens()
        lookups.append(time.perf_counter() - start)
    report["outlines_core"]["allowed_list_us_p50"] = statistics.median(lookups) * 1e6
    return report


def decode(runs: int, tokens: int) -> dict:
    """tok/s of one greedy sequence, with a `none` tool_choice grammar (masks every token, never
    forces one, so both runs may decode the same tokens) and without, alternating."""
    import asyncio
    from dataclasses import replace

    from semcache.engine.batch import Admission
    from semcache.text.chat import ChatMessage, PromptRenderer
    from semcache.engine.engine import MLXEngine
    from semcache.text.grammar import Grammars
    from semcache.scheduler.sequence import SamplingParams
    from semcache.text.tools import FALLBACK, Tool, ToolChoice

    engine = MLXEngine(None)
    asyncio.run(engine.load())
    tokenizer = engine.tokenizer
    prompt = PromptRenderer(tokenizer).render([ChatMessage("user", "Write a long story about a lighthouse.")])
    grammars = Grammars(tokenizer, engine.info.eos_token_ids)
    tool = Tool("search", "Search the web", SCHEMA)

    def one(seq_id: int, constrained: bool) -> float:
        params = SamplingParams(temperature=0.0)
        if constrained:
            params = replace(params, constraint=grammars.for_tools(FALLBACK, [tool], ToolChoice("none")))
        admit = [Admission(seq_id, prompt, params)]
        engine.batcher.step(admit, [])  # prefill + first token
        start = time.perf_counter()
        for _ in range(tokens - 1):
            engine.batcher.step([], [])
        elapsed = time.perf_counter() - start
        engine.batcher.step([], [seq_id])
        return (tokens - 1) / elapsed

    rates: dict[str, list[float]] = {"plain": [], "constrained": []}
    for run in range(runs):
        order = ("plain", "constrained") if run % 2 == 0 else ("constrained", "plain")
        for label in order:
            rates[label].append(engine._executor.submit(one, 1000 + run * 2 + (label == "constrained"),
                                                        label == "constrained").result())
    asyncio.run(engine.close())
    plain, constrained = statistics.median(rates["plain"]), statistics.median(rates["constrained"])
    return {"runs": runs, "tokens": tokens, "tok_s": rates, "median_plain": plain,
            "median_constrained": constrained, "constrained_over_plain": constrained / plain}


def run(runs: int = 5, tokens: int = 64) -> dict:
    import semcache  # noqa: F401  (OpenBLAS before MLX)
    from semcache.engine.models import embedded_model_path, load_gguf_tokenizer

    libs = libraries(load_gguf_tokenizer(embedded_model_path()))
    e2e = decode(runs, tokens)
    summary = {
        "llguidance_compile_ms": round(libs["llguidance"]["compile_s"] * 1000, 2),
        "llguidance_mask_us_p50": round(libs["llguidance"]["mask_us"]["p50"], 1),
        "llguidance_mask_us_max": round(libs["llguidance"]["mask_us"]["max"], 1),
        "decode_constrained_over_plain": round(e2e["constrained_over_plain"], 3),
        "decode_tok_s": {"plain": round(e2e["median_plain"], 2), "constrained": round(e2e["median_constrained"], 2)},
    }
    if isinstance(libs.get("outlines_core"), dict):
        summary["outlines_core_index_build_ms"] = round(libs["outlines_core"]["index_build_s"] * 1000, 1)
    return {"benchmark": "tools", "machine": machine_info(), "summary": summary, "libraries": libs,
            "decode": e2e}
