"""Running totals and age order for the agent cache's items (entries, files), so budgets never recount.

A Ledger is a mapping by key that also knows its items' bytes, in all and per tenant, and which item
is the oldest, in all and per tenant, in O(log n): a heap of (rank, sequence, key) rows, one
current row per item, the others stale and skipped (dropped when they surface, or all at once when
they outnumber the live ones). An item's rank (its last use, perhaps after a class that goes first)
may grow while it is held: a use needs no call here, the row is re-ranked when it comes to the top.
A rank that shrank (the clock stepped back) is only noticed there too: that item leaves a little late.
Sizes are taken when an item is added, so an item's size must not change while it is held.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, MutableMapping
from itertools import count
from typing import Any

T = Any  # an Entry, or a StoredFile
_SLACK = 64  # stale rows a heap may carry beyond as many as it has live ones


class _Group:
    """One tenant's share of a ledger: its keys (with their sizes), bytes and age heap."""

    __slots__ = ("sizes", "bytes", "heap")

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.bytes = 0
        self.heap: list[tuple] = []


class Ledger(MutableMapping):
    def __init__(self, rank: Callable[[T], Any], size: Callable[[T], int] = lambda item: 0,
                 tenant: Callable[[T], str] = lambda item: ""):
        self._rank, self._size, self._tenant = rank, size, tenant
        self._items: dict[str, T] = {}
        self._rows: dict[str, tuple] = {}  # key -> its current row (in the heap and its group's)
        self._heap: list[tuple] = []
        self._groups: dict[str, _Group] = {}
        self._sequence = count()  # ties in rank: the earlier added or re-ranked first
        self.bytes = 0

    # The mapping -----------------------------------------------------------------------------

    def __getitem__(self, key: str) -> T:
        return self._items[key]

    def __setitem__(self, key: str, item: T) -> None:
        if key in self._items:
            del self[key]
        self._items[key] = item
        group = self._groups.get(self._tenant(item))
        if group is None:
            group = self._groups[self._tenant(item)] = _Group()
        size = group.sizes[key] = self._size(item)
        group.bytes += size
        self.bytes += size
        self._push(key, item)

    def __delitem__(self, key: str) -> None:
        item = self._items.pop(key)
        del self._rows[key]
        tenant = self._tenant(item)
        group = self._groups[tenant]
        size = group.sizes.pop(key)
        group.bytes -= size
        self.bytes -= size
        if not group.sizes:
            del self._groups[tenant]
        else:
            self._compact(group.heap, len(group.sizes))
        self._compact(self._heap, len(self._items))

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def keys(self):
        return self._items.keys()

    def values(self):
        return self._items.values()

    def items(self):
        return self._items.items()

    def __repr__(self) -> str:
        return f"Ledger({self._items!r})"

    # Totals and age --------------------------------------------------------------------------

    def bytes_of(self, tenant: str | None = None) -> int:
        """Bytes held in all, or by one tenant."""
        if tenant is None:
            return self.bytes
        group = self._groups.get(tenant)
        return group.bytes if group is not None else 0

    def tenants(self) -> list[str]:
        return list(self._groups)

    def of(self, tenant: str) -> list[T]:
        """One tenant's items."""
        group = self._groups.get(tenant)
        return [self._items[k] for k in group.sizes] if group is not None else []

    def oldest(self, tenant: str | None = None, skip: T | None = None) -> T | None:
        """The item of lowest rank, in all or of one tenant (passing over `skip`); None if none."""
        if tenant is None:
            heap = self._heap
        elif (group := self._groups.get(tenant)) is not None:
            heap = group.heap
        else:
            return None
        held, found = None, None
        while heap:
            row = heap[0]
            key = row[2]
            if self._rows.get(key) is not row:  # removed, or re-ranked since
                heapq.heappop(heap)
                continue
            item = self._items[key]
            if self._rank(item) != row[0]:  # used since: back in line at its new rank
                self._push(key, item)
                continue
            if item is skip:
                held = heapq.heappop(heap)
                continue
            found = item
            break
        if held is not None:
            heapq.heappush(heap, held)
        return found

    def _push(self, key: str, item: T) -> None:
        row = self._rows[key] = (self._rank(item), next(self._sequence), key)
        group = self._groups[self._tenant(item)]
        heapq.heappush(self._heap, row)
        heapq.heappush(group.heap, row)
        self._compact(self._heap, len(self._items))
        self._compact(group.heap, len(group.sizes))

    def _compact(self, heap: list[tuple], live: int) -> None:
        """Drop the stale rows once they outnumber the live ones (amortized O(1) a change)."""
        if len(heap) > 2 * live + _SLACK:
            heap[:] = [row for row in heap if self._rows.get(row[2]) is row]
            heapq.heapify(heap)

    # Introspection ---------------------------------------------------------------------------

    def check(self, budget: int | None = None, share: int | None = None) -> None:
        """Assert the running totals against a recount, one current row per item in each heap, and
        the bytes within `budget` and each tenant's within `share` (past it by one item at most)."""
        assert self.bytes == sum(self._size(item) for item in self._items.values()), "ledger bytes drifted"
        largest = max((max(g.sizes.values()) for g in self._groups.values()), default=0)
        assert budget is None or self.bytes - largest <= budget, "budget exceeded by more than one item"
        assert share is None or all(g.bytes - max(g.sizes.values()) <= share for g in self._groups.values()), \
            "a tenant's share exceeded by more than one item"
        assert self._rows.keys() == self._items.keys(), "ledger rows out of step"
        assert all(g.sizes for g in self._groups.values()), "an empty tenant group was kept"
        for tenant, group in self._groups.items():
            items = [self._items[k] for k in group.sizes]
            assert all(self._tenant(item) == tenant for item in items), "item in another tenant's group"
            assert group.bytes == sum(self._size(item) for item in items), "tenant bytes drifted"
            assert sorted(r[2] for r in group.heap if self._rows.get(r[2]) is r) == sorted(group.sizes)
        assert sum(len(g.sizes) for g in self._groups.values()) == len(self._items)
        assert sorted(r[2] for r in self._heap if self._rows.get(r[2]) is r) == sorted(self._items)
