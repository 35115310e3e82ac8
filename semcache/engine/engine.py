"""The engine: model, tokenizer and the running batch; every MLX call happens on ONE dedicated thread.

`Engine` is the protocol the scheduler drives, so most tests use a fake. `MLXEngine` owns the thread
(a single-worker executor made at start-up: MLX streams are thread-local) and runs model loading and
every `Batcher.step` on it, so the event loop stays free while MLX computes. A loaded model is put in
place on the event loop, in one go, so nothing above ever sees half of a model swap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Any, Collection

from semcache.engine.batch import Batcher
from semcache.engine.types import Admission, ModelInfo, StepResult

log = logging.getLogger("semcache.engine")


@dataclass
class Prepared:
    """A loaded model not yet in place: what `MLXEngine.install` puts there."""

    spec: str | None
    loaded: Any  # models.LoadedModel
    batcher: Batcher
    seconds: float = 0.0

    @property
    def info(self) -> ModelInfo:
        return self.loaded.info


class MLXEngine:
    """Continuous batching on mlx-lm models: loading and every Batcher step (batch.py) on one thread."""

    def __init__(self, model_spec: str | None = None, prefill_chunk: int = 256, loader=None, max_draft: int = 0):
        self.model_spec = model_spec
        self.prefill_chunk = prefill_chunk
        self.max_draft = max_draft  # prompt-lookup speculation's longest draft (0: off)
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
        self.install(await self.prepare(self.model_spec))

    async def prepare(self, model_spec: str | None) -> Prepared:
        """Load a model on the engine thread without putting it in place (`install` does): if this
        is cancelled, the load still runs to its end there, and its result is dropped."""
        start = time.perf_counter()
        prepared = await self._run(self._prepare_sync, model_spec)
        prepared.seconds = time.perf_counter() - start
        return prepared

    def _prepare_sync(self, model_spec: str | None) -> Prepared:
        from semcache.engine.models import load_model

        loaded = (self._loader or load_model)(model_spec)
        return Prepared(model_spec, loaded, self._batcher(loaded.model, loaded.info))

    def install(self, prepared: Prepared) -> None:
        """Put a prepared model in place, all at once on the event loop (nothing may be running)."""
        loaded = prepared.loaded
        self.model_spec, self.model, self.tokenizer = prepared.spec, loaded.model, loaded.tokenizer
        self.batcher, self.info, self.load_seconds = prepared.batcher, loaded.info, prepared.seconds

    async def step(self, admit: list[Admission], release: list[int], keep: Collection[int] = ()) -> StepResult:
        return await self._run(self._step, admit, release, keep)

    def _step(self, admit: list[Admission], release: list[int], keep: Collection[int]) -> StepResult:
        try:
            return self.batcher.step(admit, release, keep)
        except Exception:
            # A failed step may leave the batch half-updated: start clean (the scheduler fails
            # every running sequence) rather than decode from a cache nobody can trust.
            self.batcher = self.batcher.restarted()
            raise

    def _batcher(self, model: Any, info: ModelInfo) -> Batcher:
        return Batcher(model, self.prefill_chunk, info.kv_layout, self.max_draft)

    async def close(self) -> None:
        await self._run(self._clear)
        self._executor.shutdown(wait=True)

    def _clear(self) -> None:
        self.batcher = None
        self.model = None
