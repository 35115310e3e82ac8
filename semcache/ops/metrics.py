"""Every Prometheus metric, defined once, in a registry per app (tests run many apps in one process).

Served at /metrics; disk I/O durations are timed with prometheus-async's `time` on the awaitables.
"""

from __future__ import annotations

import resource
import sys

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder

LOOKUP_RESULTS = ("memory_hit", "disk_hit", "partial", "miss")
_IO_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
# ru_maxrss is kilobytes on Linux, bytes on macOS
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.cache_lookups = Counter(
            "semcache_cache_lookups", "Agent cache lookups by result (partial: a diverged, trimmed hit)",
            ["result"], registry=r)
        self.preemptions = Counter(
            "semcache_preemptions", "Running sequences paused (KV stored, requeued) because the KV budget ran out",
            registry=r)
        self.replies_checked = Counter(
            "semcache_replies_checked", "Answered turns of named agents whose reply was re-rendered for the next turn",
            registry=r)
        self.replies_retokenized = Counter(
            "semcache_replies_retokenized", "Of those, replies that re-render as other tokens than were generated "
            "(their canonical form is prefilled for the next turn)", registry=r)
        self.reply_divergence = Histogram(
            "semcache_reply_divergence_tokens", "Where a re-rendered reply first differs from the generated tokens, "
            "in tokens from the reply's start", buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024), registry=r)
        self.cache_tokens_reused = Counter(
            "semcache_cache_tokens_reused", "Prompt tokens served from the agent cache", registry=r)
        self.cache_bytes = Gauge("semcache_cache_bytes", "Stored KV bytes per tier", ["tier"], registry=r)
        self.cache_entries = Gauge("semcache_cache_entries", "Stored entries per tier", ["tier"], registry=r)
        self.cache_evictions = Counter(
            "semcache_cache_evictions", "Entries dropped from a tier (memory: spilled to disk; disk: deleted)",
            ["tier", "reason"], registry=r)
        self.cache_quarantined = Counter(
            "semcache_cache_quarantined", "Cache files moved to quarantine (unreadable or bad hash)", registry=r)
        self.cache_disk_errors = Counter(
            "semcache_cache_disk_errors", "Failed cache file operations (op: read, write, remove) by errno name",
            ["op", "errno"], registry=r)
        self.cache_disk_write_seconds = Histogram(
            "semcache_cache_disk_write_seconds", "Time to write one entry file", buckets=_IO_BUCKETS, registry=r)
        self.cache_disk_read_seconds = Histogram(
            "semcache_cache_disk_read_seconds", "Time to read and verify one entry file", buckets=_IO_BUCKETS,
            registry=r)
        for result in LOOKUP_RESULTS:
            self.cache_lookups.labels(result)
        self._serving_metrics(r)

    def _serving_metrics(self, r: CollectorRegistry) -> None:
        self.requests = Counter("semcache_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.ttft = Histogram("semcache_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("semcache_inter_token_latency_seconds", "Time between a sequence's tokens",
                             buckets=_TOKEN_BUCKETS, registry=r)
        self.duration = Histogram("semcache_request_duration_seconds", "Arrival to the last token",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("semcache_queue_wait_seconds", "Arrival to admission into the batch",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("semcache_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("semcache_active_sequences", "Sequences in the running batch", registry=r)
        self.prompt_tokens = Counter("semcache_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("semcache_generated_tokens", "Tokens generated", registry=r)
        self.drafted_tokens = Counter("semcache_speculative_drafted_tokens", "Draft tokens verified", registry=r)
        self.accepted_tokens = Counter("semcache_speculative_accepted_tokens", "Draft tokens the model kept",
                                       registry=r)
        self.accepted_per_step = Histogram("semcache_speculative_accepted_per_step",
                                           "Draft tokens kept per verify step of a sequence",
                                           buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self.step_seconds = Histogram("semcache_step_duration_seconds", "One engine step (decode + prefill)",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.model_load_seconds = Gauge("semcache_model_load_seconds", "Time the current model took to load",
                                        registry=r)
        self.max_rss = Gauge("semcache_process_max_resident_memory_bytes", "Peak resident memory (any OS)",
                             registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc. where /proc exists (Linux)

    def sample_process(self) -> None:
        self.max_rss.set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

