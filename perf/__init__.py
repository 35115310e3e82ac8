"""Benchmark scripts that write JSON reports (run from the repository root: python -m perf NAME ...).

Each benchmark is a module or package named for what it measures (serving, agents, quant, swap,
baseline, stress, faults, tools); what they share is in common (machine facts, prompts, SSE and
/metrics parsing, numbers), servers (starting daemons) and client (the streamed chat client)."""
