"""The engine: model, tokenizer and the running batch; every MLX call happens on ONE dedicated thread.

`Engine` is the protocol the scheduler drives, so most tests use a fake. `MLXEngine.step` does, in
order: drop released sequences, one decode step for every decoding sequence together, then at most
`prefill_chunk` prompt tokens of newly admitted sequences (which join the decode batch once their
prompt is in). A long prompt therefore delays running streams by one chunk at most.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from semcache.sequence import SamplingParams

log = logging.getLogger("semcache.engine")


@dataclass(frozen=True)
class ModelInfo:
    """What layers above the engine may know about the model."""

    model_id: str
    context_length: int
    eos_token_ids: frozenset[int]
    kv_bytes_per_token: int
    path: str = ""
    backend: str = "cpu"
    dtype: str = "float32"
    nbytes: int = 0
    fingerprint: str = ""


@dataclass(frozen=True)
class Admission:
    """A sequence the scheduler hands the engine: prefill these ids, then decode with `sampling`."""

    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams


class Engine(Protocol):
    info: ModelInfo | None
    tokenizer: Any

    async def load(self) -> None:
        """Load model and tokenizer (on the engine's own thread); sets `info` and `tokenizer`."""

    async def step(self, admit: list[Admission], release: list[int]) -> dict[int, int]:
        """Drop `release`, take in `admit`, advance everything one step: {seq_id: new token id}."""

    async def close(self) -> None:
        """Free the model and stop the engine thread."""


def kv_bytes_per_token(model: Any, itemsize: int) -> int:
    """Bytes of K and V that one token occupies across all layers."""
    args = model.args
    heads = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    return 2 * len(model.layers) * heads * head_dim * itemsize


@dataclass(eq=False)
class _Row:
    seq_id: int
    sampling: SamplingParams
    key: Any = None


@dataclass(eq=False)
class _Prefill:
    admission: Admission
    cache: list[Any]
    done: int = 0
    row: _Row | None = None

    @property
    def remaining(self) -> int:
        return len(self.admission.prompt_ids) - self.done


@dataclass(eq=False)
class _Batch:
    rows: list[_Row] = field(default_factory=list)
    cache: list[Any] | None = None
    inputs: Any = None  # mx.array [B] of the last sampled tokens


class MLXEngine:
    """Continuous batching on mlx-lm models; see the module docstring for one step's anatomy."""

    def __init__(self, model_spec: str | None = None, prefill_chunk: int = 256, loader=None):
        self.model_spec = model_spec
        self.prefill_chunk = prefill_chunk
        self._loader = loader
        self.info: ModelInfo | None = None
        self.tokenizer: Any = None
        self.model: Any = None
        self.load_seconds: float | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="semcache-mlx")
        self._prefills: list[_Prefill] = []
        self._batch = _Batch()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def load(self) -> None:
        start = time.perf_counter()
        await self._run(self._load_sync)
        self.load_seconds = time.perf_counter() - start

    def _load_sync(self) -> None:
        import mlx.core as mx

        from semcache.models import load_model

        loaded = (self._loader or load_model)(self.model_spec)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        itemsize = mx.float32.size if loaded.backend == "cpu" else mx.float16.size
        self.info = ModelInfo(
            model_id=loaded.model_id,
            context_length=loaded.context_length,
            eos_token_ids=loaded.eos_token_ids,
            kv_bytes_per_token=kv_bytes_per_token(loaded.model, itemsize),
            path=loaded.path,
            backend=loaded.backend,
            dtype=loaded.dtype,
            nbytes=loaded.nbytes,
            fingerprint=loaded.fingerprint,
        )

    async def step(self, admit: list[Admission], release: list[int]) -> dict[int, int]:
        return await self._run(self.step_sync, admit, release)

    async def close(self) -> None:
        await self._run(self._clear)
        self._executor.shutdown(wait=True)

    def _clear(self) -> None:
        self._prefills.clear()
        self._batch = _Batch()

    @property
    def num_active(self) -> int:
        return len(self._prefills) + len(self._batch.rows)

    # Everything below runs on the MLX thread.

    def step_sync(self, admit: list[Admission], release: list[int]) -> dict[int, int]:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        if release:
            self._release(set(release))
        self._prefills.extend(_Prefill(a, make_prompt_cache(self.model)) for a in admit)
        out: dict[int, int] = {}
        if self._batch.rows:
            out.update(self._decode())
        joined = self._prefill_chunk()
        for prefill, token in joined:
            out[prefill.admission.seq_id] = token
        if joined:
            self._join([p for p, _ in joined], mx.array([t for _, t in joined]))
        return out

    def _release(self, ids: set[int]) -> None:
        self._prefills = [p for p in self._prefills if p.admission.seq_id not in ids]
        batch = self._batch
        keep = [i for i, row in enumerate(batch.rows) if row.seq_id not in ids]
        if len(keep) == len(batch.rows):
            return
        if not keep:
            self._batch = _Batch()
            return
        batch.rows = [batch.rows[i] for i in keep]
        for c in batch.cache:
            c.filter(keep)
        batch.inputs = batch.inputs[keep]

    def _decode(self) -> dict[int, int]:
        import mlx.core as mx

        batch = self._batch
        logits = self.model(batch.inputs[:, None], cache=batch.cache)[:, -1, :]
        tokens = self._sample(logits, batch.rows)
        mx.eval(tokens)
        batch.inputs = tokens
        return dict(zip((row.seq_id for row in batch.rows), tokens.tolist()))

    def _prefill_chunk(self) -> list[tuple[_Prefill, int]]:
        """Feed up to `prefill_chunk` prompt tokens; return sequences whose prompt is now complete."""
        import mlx.core as mx

        budget = self.prefill_chunk
        done: list[tuple[_Prefill, int]] = []
        for prefill in list(self._prefills):
            if budget <= 0:
                break
            n = min(budget, prefill.remaining)
            ids = prefill.admission.prompt_ids[prefill.done : prefill.done + n]
            logits = self.model(mx.array([ids]), cache=prefill.cache)
            prefill.done += n
            budget -= n
            if prefill.remaining:
                mx.eval([c.state for c in prefill.cache])
                continue
            row = _Row(prefill.admission.seq_id, prefill.admission.sampling)
            token = self._sample(logits[:, -1, :], [row])
            mx.eval(token)
            prefill.row = row
            done.append((prefill, token.item()))
            self._prefills.remove(prefill)
        return done

    def _join(self, prefills: list[_Prefill], tokens: Any) -> None:
        import mlx.core as mx
        from mlx_lm.models.cache import BatchKVCache

        batch = self._batch
        merged = [BatchKVCache.merge(list(layer)) for layer in zip(*(p.cache for p in prefills))]
        if not batch.rows:
            batch.cache, batch.inputs = merged, tokens
        else:
            for mine, theirs in zip(batch.cache, merged):
                mine.extend(theirs)
            batch.inputs = mx.concatenate([batch.inputs, tokens])
        batch.rows.extend(p.row for p in prefills)
        mx.eval([c.state for c in batch.cache], batch.inputs)

    def _sample(self, logits: Any, rows: list[_Row]) -> Any:
        """One token per row: a batched argmax for greedy rows, keyed sampling for the rest."""
        import mlx.core as mx

        from semcache.sampling import sample_row

        greedy = mx.argmax(logits, axis=-1)
        if all(row.sampling.greedy for row in rows):
            return greedy
        picked = [
            greedy[i : i + 1] if row.sampling.greedy else sample_row(logits[i : i + 1], row)
            for i, row in enumerate(rows)
        ]
        return mx.concatenate(picked).astype(greedy.dtype)
