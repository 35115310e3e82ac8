"""Benchmark scripts that write JSON reports (run from the repository root: python -m perf ...)."""
