"""Every Prometheus metric, defined once, in a registry per app (tests run many apps in one process).

Served at /metrics; disk I/O durations are timed with prometheus-async's `time` on the awaitables.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

TIERS = ("memory", "disk", "writing")
LOOKUP_RESULTS = ("memory_hit", "disk_hit", "partial", "miss")
_IO_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.cache_lookups = Counter(
            "semcache_cache_lookups", "Agent cache lookups by result (partial: a diverged, trimmed hit)",
            ["result"], registry=r)
        self.cache_tokens_reused = Counter(
            "semcache_cache_tokens_reused", "Prompt tokens served from the agent cache", registry=r)
        self.cache_bytes = Gauge("semcache_cache_bytes", "Stored KV bytes per tier", ["tier"], registry=r)
        self.cache_entries = Gauge("semcache_cache_entries", "Stored entries per tier", ["tier"], registry=r)
        self.cache_evictions = Counter(
            "semcache_cache_evictions", "Entries dropped from a tier (memory: spilled to disk; disk: deleted)",
            ["tier", "reason"], registry=r)
        self.cache_quarantined = Counter(
            "semcache_cache_quarantined", "Cache files moved to quarantine (unreadable or bad hash)", registry=r)
        self.cache_disk_write_seconds = Histogram(
            "semcache_cache_disk_write_seconds", "Time to write one entry file", buckets=_IO_BUCKETS, registry=r)
        self.cache_disk_read_seconds = Histogram(
            "semcache_cache_disk_read_seconds", "Time to read and verify one entry file", buckets=_IO_BUCKETS,
            registry=r)
        for result in LOOKUP_RESULTS:
            self.cache_lookups.labels(result)

    def watch_cache(self, bytes_of: Callable[[str], int], entries_of: Callable[[str], int]) -> None:
        """Gauges read the cache's own counts at scrape time, so they can never drift from it."""
        for tier in TIERS:
            self.cache_bytes.labels(tier).set_function(lambda t=tier: bytes_of(t))
            self.cache_entries.labels(tier).set_function(lambda t=tier: entries_of(t))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

