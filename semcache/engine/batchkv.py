"""KV copies between the running batch (MLX arrays, on the MLX thread) and stored cache entries
(numpy arrays owned by numpy, safe to keep, write and read anywhere)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from semcache.cache.kvdata import KVData


def restore(keys: np.ndarray, values: np.ndarray, dtype: str) -> KVCache:
    """A fresh KVCache holding a copy of stored arrays (the stored entry is never written to)."""
    c = KVCache()
    c.keys, c.values = to_mx(keys, dtype), to_mx(values, dtype)
    c.offset = keys.shape[2]
    return c


def to_mx(a: np.ndarray, dtype: str) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if dtype == "bfloat16" else out


def to_np(a: mx.array) -> np.ndarray:
    """A numpy-owned copy: stored entries hold no MLX memory, so they outlive MLX safely (a numpy
    view of MLX buffers still alive at interpreter exit aborted the process once)."""
    a = mx.contiguous(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)
    mx.eval(a)
    return np.array(a, copy=True)


def snapshot(cache: list[Any], row: int) -> KVData:
    """Copy one row's KV (prompt and generated tokens so far) out of the decode batch."""
    layers = []
    for c in cache:
        single = c if isinstance(c, KVCache) else c.extract(row)
        n = single.offset
        layers.append((to_np(single.keys[..., :n, :]), to_np(single.values[..., :n, :])))
    dtype = str(cache[0].keys.dtype).rsplit(".", 1)[-1]
    return KVData(tuple(layers), dtype)
