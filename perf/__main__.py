"""python -m perf serving --out report.json [--runs 3] [--max-tokens 64] [--no-peer]
python -m perf agents --out report.json [--agents 12] [--budget 256MiB] [--runs 3]
python -m perf quant --out report.json [--prompts 10]
python -m perf swap --out report.json [--runs 3]
python -m perf baseline|stress|faults|tools --help   (each module adds its own options)"""

import argparse
import importlib
import json
import sys
from pathlib import Path

# Benchmarks whose module declares its own options: configure(parser) and main(args) -> report.
MODULES = {
    "baseline": "JSON baseline report: start-up, latency, health, concurrency, agent cache, optional peer",
    "stress": "bounded loopback stress: overload, agent bursts, sustained load, disconnect storms",
    "faults": "fault injection: SIGKILL during cache writes, restart, check what survived",
    "tools": "constrained decoding cost: grammar compile and mask time, decode tok/s with vs without",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m perf")
    sub = parser.add_subparsers(dest="command", required=True)
    serving = sub.add_parser("serving", help="serving core benchmark vs bare mlx-lm and mlx_lm.server")
    serving.add_argument("--out", type=Path, default=Path("perf-serving.json"))
    serving.add_argument("--runs", type=int, default=3)
    serving.add_argument("--max-tokens", type=int, default=64)
    serving.add_argument("--no-peer", action="store_true", help="skip mlx_lm.server")
    agents = sub.add_parser("agents", help="agent cache benchmark: warm vs cold turns, restart, disk, misses")
    agents.add_argument("--out", type=Path, default=Path("perf-agents.json"))
    agents.add_argument("--agents", type=int, default=12)
    agents.add_argument("--max-tokens", type=int, default=32)
    agents.add_argument("--budget", default="256MiB", help="cache_memory_budget (must not fit every agent)")
    agents.add_argument("--runs", type=int, default=3, help="alternating runs of the miss-overhead test")
    quant = sub.add_parser("quant", help="effect of int8/int4 KV on disk on greedy answers")
    quant.add_argument("--out", type=Path, default=Path("perf-quant.json"))
    quant.add_argument("--prompts", type=int, default=10)
    swap = sub.add_parser("swap", help="model hot-swap time on an idle daemon")
    swap.add_argument("--out", type=Path, default=Path("perf-swap.json"))
    swap.add_argument("--runs", type=int, default=3)
    modules = {name: sub.add_parser(name, help=text) for name, text in MODULES.items()}
    chosen = sys.argv[1] if len(sys.argv) > 1 else None
    if chosen in modules:
        module = importlib.import_module(f"perf.{chosen}")
        module.configure(modules[chosen])
    args = parser.parse_args()
    if args.command in modules:
        report = module.main(args)
    elif args.command == "swap":
        from perf import swap as bench

        report = bench.run(args.out, runs=args.runs)
    elif args.command == "quant":
        from perf import quant as bench

        report = bench.run(args.out, prompts=args.prompts)
    elif args.command == "agents":
        from perf import agents as bench

        report = bench.run(args.out, agents=args.agents, max_tokens=args.max_tokens, budget=args.budget,
                           runs=args.runs)
    else:
        from perf import serving as bench

        report = bench.run(args.out, runs=args.runs, max_tokens=args.max_tokens, peer=not args.no_peer)
    print(json.dumps(report["summary"], indent=2))
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
