"""The decode batch's KV (MLX thread only): a BatchKVCache whose rows may end at different positions.

mlx-lm's BatchKVCache keeps every row's tokens right-aligned at one write index, behind per-row left
padding. A speculative verify step feeds each row its latest token and a draft, and rows keep
different numbers of them; aligning the rows again moves each row's whole KV (measured: 8 rows of
~560 tokens on the embedded model, 0.18-0.22 s a step, more than the 0.13 s forward pass itself).

Here a row that kept fewer tokens just ends earlier: `ends[i]` is where row i writes next, its KV
is `[left_padding[i], ends[i])`, and what lies after it (its rejected positions) is masked out and
overwritten by its next tokens. Writes go to each row's own end (one scatter per layer), and the
attention mask lets row i's queries see only its own valid span, causally. Rows are aligned again
(one roll) only when their ends drift more than `MAX_SPREAD` apart, so the masked columns every row
computes stay few. A row's RoPE position (`offset`) is its logical length, untouched by any of this.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, dynamic_roll

# Ends may drift this far apart before the rows are aligned again (a copy of the whole batch's KV).
MAX_SPREAD = 48


class RaggedKV(BatchKVCache):
    def __init__(self, left_padding: list[int]):
        super().__init__(left_padding)
        self.ends: list[int] | None = None  # each row's next write position; None: all at _idx

    @classmethod
    def adopt(cls, cache: Any) -> "RaggedKV":
        """The same KV as a RaggedKV (no copy): from a one-row KVCache or a BatchKVCache."""
        if isinstance(cache, cls):
            return cache
        if isinstance(cache, KVCache):
            return cls.merge([cache])
        out = cls.__new__(cls)
        out.__dict__.update(cache.__dict__)
        out.ends = None
        return out

    def row_ends(self) -> list[int]:
        return list(self.ends) if self.ends is not None else [self._idx] * self.left_padding.shape[0]

    def _set_ends(self, ends: list[int]) -> None:
        self._idx = max(ends)
        self.ends = None if min(ends) == self._idx else ends

    # The forward pass ---------------------------------------------------------------------------

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        if self.ends is None:
            return super().update_and_fetch(keys, values)
        n = keys.shape[2]
        top = max(self.ends) + n
        self._reserve(top)
        at = mx.array(self.ends)[:, None, None, None] + mx.arange(n)[None, None, :, None]
        self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(at, keys.shape), keys, axis=2)
        self.values = mx.put_along_axis(self.values, mx.broadcast_to(at, values.shape), values, axis=2)
        self.offset = self.offset + n
        self.ends = [e + n for e in self.ends]
        self._idx = top
        return self.keys[..., :top, :], self.values[..., :top, :]

    def _reserve(self, size: int) -> None:
        have = self.keys.shape[2]
        if size <= have:
            return
        grow = -(-(size - have) // self.step) * self.step
        pad = [(0, 0), (0, 0), (0, grow), (0, 0)]
        self.keys, self.values = mx.pad(self.keys, pad), mx.pad(self.values, pad)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **kwargs: Any) -> Any:
        """Row i's query j (at ends[i] + j) sees keys in [left_padding[i], ends[i] + j]."""
        if self.ends is None:
            return super().make_mask(N, return_array=return_array, window_size=window_size, **kwargs)
        keys = mx.arange(max(self.ends) + N)[None, None, :]
        queries = (mx.array(self.ends)[:, None] + mx.arange(N)[None, :])[:, :, None]
        mask = (keys <= queries) & (keys >= self.left_padding[:, None, None])
        if window_size is not None:
            mask = mask & (keys > queries - window_size)
        return mask[:, None]

    # Speculation --------------------------------------------------------------------------------

    def trim_rows(self, counts: list[int]) -> None:
        """Forget each row's last `counts[i]` tokens (no copy; aligns the rows if they drift apart)."""
        ends = [e - n for e, n in zip(self.row_ends(), counts)]
        self.offset = self.offset - mx.array(counts)
        self._set_ends(ends)
        if self.ends is not None and self._idx - min(self.ends) > MAX_SPREAD:
            self.align()

    def align(self) -> None:
        """Move every row's KV right so that all end at _idx (what BatchKVCache expects)."""
        if self.ends is None:
            return
        shift = mx.array([self._idx - e for e in self.ends])
        n = self._idx
        self.keys[..., :n, :] = dynamic_roll(self.keys[..., :n, :], shift[:, None], axis=2)
        self.values[..., :n, :] = dynamic_roll(self.values[..., :n, :], shift[:, None], axis=2)
        self.left_padding = self.left_padding + shift
        self.ends = None

    # Batch changes ------------------------------------------------------------------------------

    def filter(self, batch_indices: list[int]) -> None:
        ends = [self.row_ends()[i] for i in batch_indices]
        before = self._idx
        super().filter(batch_indices)
        cut = before - self._idx  # the padding every remaining row had, now cut off
        self._set_ends([e - cut for e in ends])

    def extend(self, other: Any) -> None:
        mine, theirs = self.row_ends(), (other.row_ends() if isinstance(other, RaggedKV)
                                         else [other._idx] * other.left_padding.shape[0])
        idx, other_idx = self._idx, other._idx
        super().extend(other)  # right-justifies both at the larger index
        self._set_ends([e + self._idx - idx for e in mine] + [e + self._idx - other_idx for e in theirs])

    def extract(self, idx: int) -> KVCache:
        if self.ends is None:
            return super().extract(idx)
        full, self._idx = self._idx, self.ends[idx]
        try:
            return super().extract(idx)
        finally:
            self._idx = full


def trim_rows(cache: list[Any], counts: list[int]) -> None:
    """Forget each row's last `counts[i]` positions in every layer (speculative tokens the model rejected)."""
    if not any(counts):
        return
    for c in cache:
        if isinstance(c, KVCache):  # one row: plain trim
            c.trim(counts[0])
        else:
            c.trim_rows(counts)
