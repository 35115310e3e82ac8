"""Speculative verify steps on the CPU: attention and SwiGLU with a fused exp, at about half the cost.

A verify step feeds each decode row its latest token and a draft (2-16 queries a row) against a long
KV. On MLX's CPU backend, mx.fast.scaled_dot_product_attention then spends most of its time in the
softmax's `exp`, which runs one element at a time (measured on a 2-core AMD EPYC: 86 M exp/s, against
1.3 G/s for numpy's). Measured per layer, 8 rows x 560 keys x 9 heads: 1.1 ms at 1 query a row,
2.0 at 2, 4.4 at 4; so feeding a draft cost more in attention than in every matmul of the model.

Here the softmax's exp is a Cephes-style polynomial (relative error < 1e-7, better than the CPU
kernel's 2e-6) that mx.compile fuses with the max subtraction into one pass; grouped-query heads
share their KV without copies. SwiGLU's sigmoid (exp again, on every hidden unit of every fed token)
goes through the same exp, fused with its products. Measured on the embedded model, 8 rows of ~560 tokens, whole verify
step with and without the attention, alternating: 0.92x the time at 2 queries a row, 0.80x at 3,
0.77x at 4; the SwiGLU then takes off another 5% (0.95x at 2 and 4 queries, 0.92x at 6).

They are used only while `verifying()` is in force (Forward.every), for float32 on the CPU, and only
for families that call `scaled_dot_product_attention` and `swiglu` from their module (llama, qwen2,
qwen3); every other call (prefill, plain decode, quantized KV, sinks) goes to mlx-lm's own
functions, so speculation off runs exactly what it ran before.

A compiled function is traced once per input shape and keeps that trace; verify shapes change every
step (the KV grows), so each shape gets its own compiled function and only the last `_KEEP` are kept
(MLX drops a compiled function's traces with it): memory and lookups stay bounded.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import OrderedDict
from typing import Any, Iterator

import mlx.core as mx

MAX_QUERIES = 16  # queries a row above this (prefill) keep mlx-lm's attention
_KEEP = 16
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06  # ln 2 split for an exact n * ln 2
_ROUND = 12582912.0  # 1.5 * 2^23: (t + _ROUND) - _ROUND is t rounded to the nearest integer

_state = threading.local()  # .on: a verify step is being built on this thread
_compiled: OrderedDict[tuple, Any] = OrderedDict()  # (name, shapes) -> compiled function


def exp_nonpositive(x: Any) -> Any:
    """exp(x) for float32 x <= 0: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-7 polynomial, 2^n
    written into the exponent bits. Below -87 it gives ~1.6e-38 instead of less (a masked score's
    weight is then 1e-38 of the row's, below float32 resolution).

    n is rounded by adding and subtracting 1.5 * 2^23 (exact for |n| < 2^22) rather than by floor:
    mx.compile builds its CPU kernels with g++ -O3 and no -march, and without SSE4.1 g++ does not
    vectorise a loop with floor in it; with the add it does (measured: 0.18 against 0.30 ms for a
    verify step's 86,000 scores, 1.7x)."""
    x = mx.maximum(x, -87.0)
    n = (x * _LOG2E + _ROUND) - _ROUND
    r = x - n * _LN2_HI - n * _LN2_LO
    p = 1.9875691500e-4 * r + 1.3981999507e-3
    for c in (8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + c
    p = p * r * r + r + 1.0
    return p * mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)


def _fused(name: str, body: Any, *arrays: Any) -> Any:
    """body(*arrays) compiled for these shapes: one compiled function per shape, the last _KEEP kept."""
    key = (name, *(a.shape for a in arrays))
    fn = _compiled.get(key)
    if fn is None:
        fn = _compiled[key] = mx.compile(lambda *a: body(*a))  # a new function: its own compile cache
        while len(_compiled) > _KEEP:
            _compiled.popitem(last=False)
    else:
        _compiled.move_to_end(key)
    return fn(*arrays)


def _shifted(s: Any, m: Any) -> Any:
    return exp_nonpositive(s - m)


def _swiglu(g: Any, v: Any) -> Any:
    t = exp_nonpositive(-mx.abs(g))  # the sigmoid from exp(-|g|): the exp never sees a positive argument
    return g * mx.where(g >= 0, 1.0, t) / (1.0 + t) * v


def _shifted_exp(scores: Any, top: Any) -> Any:
    """exp(scores - top), fused."""
    return _fused("exp", _shifted, scores, top)


def swiglu(gate: Any, x: Any) -> Any:
    """silu(gate) * x, fused."""
    return _fused("swiglu", _swiglu, gate, x)


def attention(q: Any, k: Any, v: Any, scale: float, mask: Any) -> Any:
    """softmax(q k^T * scale + mask) v for q [B, Hq, L, D], k/v [B, Hk, S, D] (Hq a multiple of Hk);
    mask None, "causal", boolean (True = attend) or additive, broadcastable to [B, Hq, L, S]."""
    B, Hq, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    rep = Hq // Hk
    scores = ((q * scale).reshape(B, Hk, rep * L, D) @ k.swapaxes(-1, -2)).reshape(B, Hk, rep, L, S)
    if isinstance(mask, str):
        mask = mx.arange(S)[None, :] <= mx.arange(S - L, S)[:, None]
    if mask is not None:
        if mask.ndim == 3:  # [B, L, S]
            mask = mask[:, None, None]
        elif mask.ndim == 4:  # [B, 1 or Hq, L, S]
            mask = mask.reshape(mask.shape[0], *((1, 1) if mask.shape[1] == 1 else (Hk, rep)), *mask.shape[-2:])
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    weights = _shifted_exp(scores, scores.max(-1, keepdims=True))
    out = weights.reshape(B, Hk, rep * L, S) @ v
    return (out / weights.sum(-1).reshape(B, Hk, rep * L, 1)).reshape(B, Hq, L, D)


@contextlib.contextmanager
def verifying() -> Iterator[None]:
    """Verify steps inside use `attention` where it applies."""
    _state.on = True
    try:
        yield
    finally:
        _state.on = False


def install(model: Any) -> bool:
    """Route the model family's attention and SwiGLU through these in verify steps (once per family;
    CPU only). False if the family calls neither from its module."""
    if mx.default_device().type != mx.cpu:
        return False
    module = sys.modules.get(type(model).__module__)
    attend, glu = getattr(module, "scaled_dot_product_attention", None), getattr(module, "swiglu", None)
    if attend is not None and not hasattr(attend, "_semcache_original"):
        def routed_attention(queries, keys, values, cache, scale, mask, sinks=None):
            if (getattr(_state, "on", False) and sinks is None and not hasattr(cache, "bits")
                    and queries.dtype == mx.float32 and 1 < queries.shape[2] <= MAX_QUERIES):
                return attention(queries, keys, values, scale, mask)
            return attend(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

        routed_attention._semcache_original = attend
        module.scaled_dot_product_attention = routed_attention
    if glu is not None and not hasattr(glu, "_semcache_original"):
        def routed_swiglu(gate, x):
            if getattr(_state, "on", False) and gate.dtype == mx.float32 and x.dtype == mx.float32:
                return swiglu(gate, x)
            return glu(gate, x)

        routed_swiglu._semcache_original = glu
        module.swiglu = routed_swiglu
    return attend is not None or glu is not None
