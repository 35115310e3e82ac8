"""The disk tier's budgets: which files go when the disk budget, or one tenant's share of it, is
exceeded, and which other-model files have expired. Part of DiskTier (disk.py), kept apart from its
file handling.

Files are chosen from the tier's Ledgers (ledger.py) in O(log n) each: the least recently used of
this model's entries with a file and of other models' files. A tenant past its share loses only its
own files. A resident entry loses only its file (it is written again if it spills); an entry only
on disk goes with its file.
"""

from __future__ import annotations

from typing import Iterable



class DiskBudget:
    """Mixed into DiskTier, whose stored and foreign Ledgers, byte count and removals it uses."""

    def expire(self, cutoff: float) -> None:
        """Delete the other models' files last used before `cutoff`."""
        while (other := self.foreign.oldest()) is not None and other.meta.last_use < cutoff:
            self._drop_foreign(other.meta.key)

    def enforce_budget(self, tenants: Iterable[str] = ()) -> None:
        """Delete the least recently used files past each of `tenants`' share of the budget (its own
        files only), then past the budget (an entry only on disk goes too)."""
        share = self.limits.share(self.limits.disk_budget)
        for tenant in tenants if share is not None else ():
            self._trim(tenant, share)
        self._trim(None, self.limits.disk_budget)
        self._update_gauges()

    def held(self, tenant: str | None = None) -> int:
        """Bytes on disk: all (replaced files not deleted yet included), or one tenant's files."""
        return self.bytes if tenant is None else self.stored.bytes_of(tenant) + self.foreign.bytes_of(tenant)

    def _trim(self, tenant: str | None, budget: int) -> None:
        while self.held(tenant) > budget:
            oldest, other = self.stored.oldest(tenant), self.foreign.oldest(tenant)
            if other is not None and (oldest is None or other.meta.last_use < oldest.last_use):
                self._drop_foreign(other.meta.key)
            elif oldest is None:
                return
            elif oldest.data is None and oldest.pending is None:
                self._drop(oldest, "budget")
            else:  # resident: it keeps living in memory, to be written again if spilled
                self.bytes -= oldest.file_bytes
                self.access.remove(oldest.path)
                self._unstore(oldest)
                oldest.file_bytes, oldest.dirty = 0, True
            self.metrics.cache_evictions.labels("disk", "budget").inc()
