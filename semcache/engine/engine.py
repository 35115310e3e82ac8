"""The engine: model, tokenizer and the running batch; every MLX call happens on ONE dedicated thread.

`Engine` is the protocol the scheduler drives, so most tests use a fake. `MLXEngine` owns the thread
(a single-worker executor made at start-up: MLX streams are thread-local) and runs model loading and
every `Batcher.step` on it, so the event loop stays free while MLX computes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any, Collection

from semcache.engine.batch import Batcher
from semcache.engine.types import Admission, ModelInfo, StepResult

log = logging.getLogger("semcache.engine")


class MLXEngine:
    """Continuous batching on mlx-lm models: loading and every Batcher step (batch.py) on one thread."""

    def __init__(self, model_spec: str | None = None, prefill_chunk: int = 256, loader=None):
        self.model_spec = model_spec
        self.prefill_chunk = prefill_chunk
        self._loader = loader
        self.info: ModelInfo | None = None
        self.tokenizer: Any = None
        self.model: Any = None
        self.load_seconds: float | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="semcache-mlx")
        self.batcher: Batcher | None = None

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def load(self) -> None:
        start = time.perf_counter()
        await self._run(self._load_sync)
        self.load_seconds = time.perf_counter() - start

    def _load_sync(self) -> None:
        from semcache.engine.models import load_model

        loaded = (self._loader or load_model)(self.model_spec)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.batcher = Batcher(loaded.model, self.prefill_chunk, loaded.info.kv_layout)
        self.info = loaded.info

    async def swap(self, model_spec: str) -> None:
        """Load another model in place of this one; if that fails, this one stays (and it raises)."""
        start = time.perf_counter()
        await self._run(self._swap_sync, model_spec)
        self.load_seconds = time.perf_counter() - start

    def _swap_sync(self, model_spec: str) -> None:
        previous, self.model_spec = self.model_spec, model_spec
        try:
            self._load_sync()  # assigns nothing until the new model has loaded
        except BaseException:
            self.model_spec = previous
            raise

    async def step(self, admit: list[Admission], release: list[int], keep: Collection[int] = ()) -> StepResult:
        return await self._run(self._step, admit, release, keep)

    def _step(self, admit: list[Admission], release: list[int], keep: Collection[int]) -> StepResult:
        try:
            return self.batcher.step(admit, release, keep)
        except Exception:
            # A failed step may leave the batch half-updated: start clean (the scheduler fails
            # every running sequence) rather than decode from a cache nobody can trust.
            self.batcher = Batcher(self.model, self.prefill_chunk, self.info.kv_layout)
            raise

    async def close(self) -> None:
        await self._run(self._clear)
        self._executor.shutdown(wait=True)

    def _clear(self) -> None:
        self.batcher = None
        self.model = None
