"""The waiting side of the scheduler: queued sequences in priority order, and the places they hold.

A handler reserves a place before it tokenizes (so a refusal costs no template work), then puts
its sequence in; the scheduler loop moves arrivals into a heap and takes the sequences it admits.
"""

from __future__ import annotations

import asyncio
import heapq

from semcache.scheduler.sequence import Sequence, Status

Item = tuple[tuple, Sequence]


class Overloaded(Exception):
    """Capacity refused the request; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int, unavailable: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.unavailable = unavailable  # the daemon is shutting down, not just busy


class Waiting:
    """Queued sequences (arrivals, then the loop's heap) and the counts the queue limit is about."""

    def __init__(self) -> None:
        self._arrivals: asyncio.PriorityQueue[Item] = asyncio.PriorityQueue()
        self._heap: list[Item] = []
        self.num_waiting = 0  # queued and not ended
        self.num_reserved = 0  # places held by requests still being tokenized

    def __len__(self) -> int:
        """Entries in the loop's heap (arrivals not drained yet are not counted)."""
        return len(self._heap)

    @property
    def num_places(self) -> int:
        return self.num_waiting + self.num_reserved

    def reserve(self) -> None:
        self.num_reserved += 1

    def unreserve(self) -> None:
        self.num_reserved -= 1

    def put(self, seq: Sequence) -> None:
        """Queue `seq` (never blocks)."""
        seq.status = Status.WAITING
        self.num_waiting += 1
        self._arrivals.put_nowait((seq.sort_key(), seq))

    def left(self, seq: Sequence) -> None:
        """A waiting `seq` ended without being admitted; its heap entry is skipped later."""
        assert seq.status is Status.WAITING
        self.num_waiting -= 1

    async def arrival(self) -> None:
        """Until a sequence arrives (the loop blocks here when nothing else is to be done)."""
        self.push(await self._arrivals.get())

    def drain(self) -> None:
        """Move every arrival into the heap."""
        while True:
            try:
                self.push(self._arrivals.get_nowait())
            except asyncio.QueueEmpty:
                return

    def first(self) -> Sequence | None:
        """The next sequence in priority order (ended ones are dropped on the way), or None."""
        while self._heap and self._heap[0][1].is_done:
            heapq.heappop(self._heap)
        return self._heap[0][1] if self._heap else None

    def take(self) -> Sequence:
        """Remove the first sequence: it is admitted."""
        self.num_waiting -= 1
        return heapq.heappop(self._heap)[1]

    def pass_over(self) -> Item:
        """Remove the first entry for this round only (push it back after): it still waits."""
        return heapq.heappop(self._heap)

    def push(self, item: Item) -> None:
        heapq.heappush(self._heap, item)

    def sequences(self) -> list[Sequence]:
        """Every queued sequence, ended ones included (heap and arrivals)."""
        return [seq for _, seq in self._heap + list(self._arrivals._queue)]  # type: ignore[attr-defined]

    def check_integrity(self) -> None:
        assert self.num_waiting == sum(1 for seq in self.sequences() if not seq.is_done), "num_waiting drifted"
        assert self.num_reserved >= 0, "more places given back than reserved"
