"""The generations the daemon answered lately, for GET /v1/status: the last ones in full, and their
hit rate and TTFT percentiles over a sliding window. Each record belongs to its tenant, and a
tenant's view holds only its own (the admin's view, `tenant=None`, holds all)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable

WINDOW_SECONDS = 300.0
MAX_RECORDS = 20_000  # bounds the window's memory under any load (about 4 MB)


@dataclass(frozen=True)
class Record:
    time: float  # epoch seconds when the response ended
    tenant: str
    agent: str
    route: str
    status: int
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    cache: str  # memory, disk or miss
    ttft_ms: float | None
    duration_ms: float

    def public(self, with_tenant: bool) -> dict:
        out = asdict(self)
        out["time"] = round(self.time, 3)
        if not with_tenant:
            del out["tenant"]
        return out


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank `q` percentile (0-100) of `values`; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


class Recent:
    def __init__(self, window: float = WINDOW_SECONDS, clock: Callable[[], float] = time.time):
        self.window, self.clock = window, clock
        self.records: deque[Record] = deque(maxlen=MAX_RECORDS)

    def add(self, record: Record) -> None:
        self.records.append(record)
        self._prune()

    def _prune(self) -> None:
        since = self.clock() - self.window
        while self.records and self.records[0].time < since:
            self.records.popleft()

    def _of(self, tenant: str | None):
        """Newest first, the tenant's (all with None)."""
        return (r for r in reversed(self.records) if tenant is None or r.tenant == tenant)

    def last(self, n: int, tenant: str | None) -> list[dict]:
        """The `n` newest records in the scope, newest first."""
        out = []
        for record in self._of(tenant):
            if len(out) >= n:
                break
            out.append(record.public(with_tenant=tenant is None))
        return out

    def summary(self, tenant: str | None) -> dict:
        """Over the window: requests, hit rate (requests that reused a prefix), the share of prompt
        tokens served from the cache, and TTFT p50/p95 in ms (all, warm and cold)."""
        self._prune()
        records = list(self._of(tenant))
        prompt = sum(r.prompt_tokens for r in records)
        hits = [r for r in records if r.cache != "miss"]

        def ttft(rs: list[Record]) -> dict:
            values = [r.ttft_ms for r in rs if r.ttft_ms is not None]
            return {"p50": percentile(values, 50), "p95": percentile(values, 95)}

        return {
            "seconds": int(self.window),
            "requests": len(records),
            "hit_rate": round(len(hits) / len(records), 4) if records else None,
            "cached_token_rate": round(sum(r.cached_tokens for r in records) / prompt, 4) if prompt else None,
            "ttft_ms": ttft(records),
            "ttft_ms_warm": ttft(hits),
            "ttft_ms_cold": ttft([r for r in records if r.cache == "miss"]),
        }
