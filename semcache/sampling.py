"""Temperature / top-k / top-p sampling with a per-sequence PRNG key, so `seed` reproduces text."""

from __future__ import annotations

import secrets
from typing import Any

import mlx.core as mx


def sample_row(logits: mx.array, row: Any) -> mx.array:
    """Sample one token from logits [1, V] with row.sampling; advances row.key."""
    params = row.sampling
    if row.key is None:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        row.key = mx.random.key(seed % (1 << 63))
    row.key, sub = mx.random.split(row.key)
    logits = logits.astype(mx.float32) / max(params.temperature, 1e-5)
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.sort(logits, axis=-1)[:, -params.top_k][:, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if params.top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs
        # The most likely token always stays, so top_p=0 means greedy rather than an empty set.
        outside = (before >= params.top_p) & (mx.arange(vocab) > 0)
        sorted_logits = mx.where(outside, -mx.inf, sorted_logits)
        token = mx.random.categorical(sorted_logits, key=sub)
        return mx.take_along_axis(order, token[:, None], axis=-1)[:, 0]
    return mx.random.categorical(logits, key=sub)
