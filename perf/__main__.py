"""python -m perf serving --out report.json [--runs 3] [--max-tokens 64] [--no-peer]
python -m perf agents --out report.json [--agents 12] [--budget 256MiB] [--runs 3]
python -m perf quant --out report.json [--prompts 10]
python -m perf swap --out report.json [--runs 3]
python -m perf cache-index --out report.json [--entries 50000]
python -m perf spec --out report.json [--runs 5] [--max-tokens 128] [--concurrent 8]
python -m perf baseline|stress|faults|tools|agents-cc --help   (each module adds its own options)"""

import argparse
import importlib
import json
import sys

# Each benchmark is the module perf.<name>: configure(parser) declares its options and main(args) runs
# it, writes its JSON report to args.out and returns it. Only the chosen one is imported.
BENCHMARKS = {
    "serving": "serving core benchmark vs bare mlx-lm and mlx_lm.server",
    "agents": "agent cache benchmark: warm vs cold turns, restart, disk, misses",
    "quant": "effect of int8/int4 KV on disk on greedy answers",
    "swap": "model hot-swap time on an idle daemon",
    "baseline": "JSON baseline report: start-up, latency, health, concurrency, agent cache, optional peer",
    "stress": "bounded loopback stress: overload, agent bursts, sustained load, disconnect storms",
    "faults": "fault injection: SIGKILL during cache writes, restart, check what survived",
    "tools": "constrained decoding cost: grammar compile and mask time, decode tok/s with vs without",
    "agents-cc": "Claude Code sessions on the embedded model: every request's status, per-turn cache reuse",
    "spec": "prompt-lookup speculative decoding off vs on: copy-heavy and free turns, alone and 8 at once",
    "cache-index": "agent cache bookkeeping: put, lookup, evict with 50,000 synthetic entries (no model)",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m perf")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {name: sub.add_parser(name, help=text) for name, text in BENCHMARKS.items()}
    chosen = sys.argv[1] if len(sys.argv) > 1 else None
    if chosen in parsers:
        importlib.import_module(_module(chosen)).configure(parsers[chosen])
    args = parser.parse_args()  # without a known benchmark first, this exits with the usage
    report = importlib.import_module(_module(args.command)).main(args)
    print(json.dumps(report["summary"], indent=2))
    print(f"report written to {args.out}")


def _module(name: str) -> str:
    return "perf." + name.replace("-", "_")


if __name__ == "__main__":
    main()
