"""The model's forward pass over prompt or decode tokens, as the batch (batch.py) runs it: logits only
where they are sampled, and for the families whose head can be split off, through a transposed copy
of the vocabulary projection, and verify steps through fastexp.py's attention and SwiGLU. On the MLX thread only.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import mlx.core as mx

from semcache.engine import fastexp

# Model families whose __call__ is exactly `head(model.model(x))`; others go through model(x).
_SPLITTABLE = ("llama", "qwen2", "qwen3", "mistral")


class Forward:
    def __init__(self, model: Any):
        self.model = model
        family = type(model).__module__.rsplit(".", 1)[-1]
        self._split = family in _SPLITTABLE and hasattr(model, "model")
        self._head_t = self._transposed_head() if self._split else None
        fastexp.install(model)  # verify steps' attention and SwiGLU on the CPU (fastexp.py)

    def __call__(self, tokens: Any, cache: list[Any], last_logits: bool, positions: Any = None) -> Any:
        """Run the model on prompt tokens; logits at each row's `positions` (default: the last), or None."""
        rows = mx.arange(tokens.shape[0])
        at = positions if positions is not None else mx.full((tokens.shape[0],), tokens.shape[1] - 1)
        if not self._split:
            logits = self.model(tokens, cache=cache)
            return logits[rows, at] if last_logits else None
        hidden = self.model.model(tokens, cache=cache)
        if not last_logits:
            return None
        return self.head(hidden[rows, at] if tokens.shape[1] > 1 else hidden[:, 0, :])

    def every(self, tokens: Any, cache: list[Any]) -> Any:
        """Run the model on tokens [B, L]; logits [B, L, V] at every position (speculative verification)."""
        with fastexp.verifying():
            if not self._split:
                return self.model(tokens, cache=cache)
            return self.head(self.model.model(tokens, cache=cache))

    def head(self, last: Any) -> Any:
        """The vocabulary projection of hidden states [..., H]."""
        if self._head_t is not None:
            return last @ self._head_t
        head = getattr(self.model, "lm_head", None)
        return head(last) if head is not None else self.model.model.embed_tokens.as_linear(last)

    def _transposed_head(self) -> Any:
        """The vocabulary projection's float weight transposed into its own contiguous copy, if
        that is faster here than the model's own projection; else None.

        `h @ Wt` gives bit-identical logits to `h @ W.T`, but which is faster depends on the BLAS
        and the CPU: on a 2-core Xeon (AVX-512) it took 4.8 instead of 8.5 ms for one row; on a
        2-core AMD EPYC, 18 instead of 10 ms (embedded model). So both are timed once at load
        (~0.5 s) and the copy (113 MB for the embedded model) is kept only if it wins by 5 %.
        Quantized heads: None.
        """
        head = getattr(self.model, "lm_head", None)
        module = head if head is not None else self.model.model.embed_tokens
        weight = getattr(module, "weight", None)
        if weight is None or hasattr(module, "scales") or not mx.issubdtype(weight.dtype, mx.floating):
            return None
        if head is not None and "bias" in head:
            return None
        transposed = mx.contiguous(weight.T)
        mx.eval(transposed)
        own = head if head is not None else self.model.model.embed_tokens.as_linear
        copy = _seconds(lambda h: h @ transposed, weight)
        return transposed if copy < 0.95 * _seconds(own, weight) else None


def _seconds(project: Any, weight: Any, repeats: int = 9) -> float:
    """The median time of projecting one hidden state [1, H] to the vocabulary."""
    h = mx.random.normal((1, weight.shape[1])).astype(weight.dtype)
    mx.eval(h)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(project(h))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
