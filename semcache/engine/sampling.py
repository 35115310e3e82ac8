"""Temperature / top-k / top-p sampling with a per-sequence PRNG key, so `seed` reproduces text."""

from __future__ import annotations

import secrets
from typing import Any

import mlx.core as mx
import numpy as np


def sample_row(logits: mx.array, row: Any) -> mx.array:
    """Sample one token from logits [1, V] with row.sampling; advances row.key."""
    params = row.sampling
    sub = next_key(row)
    logits = _top_k(logits.astype(mx.float32) / max(params.temperature, 1e-5), params.top_k)
    if params.top_p < 1.0:
        order, sorted_logits = _top_p_sorted(logits, params.top_p)
        token = mx.random.categorical(sorted_logits, key=sub)
        return mx.take_along_axis(order, token[:, None], axis=-1)[:, 0]
    return mx.random.categorical(logits, key=sub)


def next_key(row: Any) -> mx.array:
    """A fresh subkey from the row's PRNG key (seeded from its `seed`, else at random), which advances."""
    if row.key is None:
        seed = row.sampling.seed if row.sampling.seed is not None else secrets.randbits(63)
        row.key = mx.random.key(seed % (1 << 63))
    row.key, sub = mx.random.split(row.key)
    return sub


def _top_k(logits: mx.array, top_k: int) -> mx.array:
    if 0 < top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    return logits


def _top_p_sorted(logits: mx.array, top_p: float) -> tuple[mx.array, mx.array]:
    """(order, logits sorted by it with the tokens outside the top-p nucleus at -inf)."""
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs
    # The most likely token always stays, so top_p=0 means greedy rather than an empty set.
    outside = (before >= top_p) & (mx.arange(logits.shape[-1]) > 0)
    return order, mx.where(outside, -mx.inf, sorted_logits)


def sample_batch(logits: mx.array, rows: list[Any]) -> mx.array:
    """One token per row; rows with a grammar constraint sample only tokens it allows, and the
    constraint then advances by the token sampled."""
    constrained = [i for i, row in enumerate(rows) if row.sampling.constraint is not None]
    if not constrained:
        return _pick(logits, rows)
    width = logits.shape[-1]
    allowed = np.ones((len(rows), width), dtype=bool)
    for i in constrained:
        allowed[i] = rows[i].sampling.constraint.allowed(width)
    tokens = _pick(mx.where(mx.array(allowed), logits, -mx.inf), rows)
    values = tokens.tolist()
    for i in constrained:
        rows[i].sampling.constraint.advance(values[i])
    return tokens

def _pick(logits: mx.array, rows: list[Any]) -> mx.array:
    """One token per row: a batched argmax for greedy rows, keyed sampling for the rest."""
    greedy = mx.argmax(logits, axis=-1)
    if all(row.sampling.greedy for row in rows):
        return greedy
    picked = [
        greedy[i : i + 1] if row.sampling.greedy else sample_row(logits[i : i + 1], row)
        for i, row in enumerate(rows)
    ]
    return mx.concatenate(picked).astype(greedy.dtype)
