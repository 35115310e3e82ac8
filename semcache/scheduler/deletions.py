"""Deletion wins: a sequence whose tenant's or agent's cache entries were deleted after its request
started never stores its KV, so nothing a deleted agent had in flight comes back once it finishes.

A request notes `Deletions.count` when it starts (its epoch); deleting an agent or purging a tenant
records one more. Only the latest deletions are remembered (memory stays bounded): a sequence older
than all of them is treated as deleted, which is always safe (a store dropped costs a cold prefill).
"""

from __future__ import annotations

from collections import deque

REMEMBERED = 1024


class Deletions:
    """The latest deletions, numbered; pure (no asyncio)."""

    def __init__(self, remembered: int = REMEMBERED):
        self.count = 0  # deletions so far: a request's epoch is the count when it started
        self._recent: deque[tuple[int, str, str | None]] = deque(maxlen=remembered)

    def record(self, tenant: str, agent: str | None = None) -> None:
        """The tenant's entries (only `agent`'s, with an agent) are being deleted now."""
        self.count += 1
        self._recent.append((self.count, tenant, agent))

    def covers(self, epoch: int, tenant: str, agent: str | None) -> bool:
        """Whether a deletion since `epoch` covers the tenant's `agent`: then its KV is not stored."""
        if epoch >= self.count:
            return False
        if self._recent[0][0] > epoch + 1:  # deletions it lived through are no longer remembered
            return True
        return any(n > epoch and t == tenant and a in (None, agent) for n, t, a in self._recent)
