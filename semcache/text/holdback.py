"""What a streaming matcher must hold back: the end of the text that could still become a marker
(a stop string, a tool call's opening tag) once the next piece arrives."""

from __future__ import annotations

import bisect


class Markers:
    """A set of marker strings, any number of them: a caller may send thousands of stop strings,
    and `held_back` runs on the event loop for every token."""

    def __init__(self, markers: tuple[str, ...] | list[str]):
        self._sorted = sorted(set(m for m in markers if m))
        self._max_len = max(map(len, self._sorted), default=0)

    def held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a marker. The first
        sorted marker >= a suffix starts with it if any marker does, so the cost does not grow with
        the number of markers."""
        for n in range(min(self._max_len - 1, len(text)), 0, -1):
            suffix = text[len(text) - n:]
            i = bisect.bisect_left(self._sorted, suffix)
            if i < len(self._sorted) and self._sorted[i].startswith(suffix):
                return n
        return 0
