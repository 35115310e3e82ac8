"""The model in place and its hot swap (POST /admin/model), kept whole whatever happens meanwhile.

A swap pauses admissions, lets running sequences finish, loads the new model on the engine thread,
then switches the agent cache, the engine and the renderer to it in one step of the event loop.
It runs in its own task: a client that gives up (its handler is cancelled) leaves it to end as a
whole swap. Cancelled on purpose (shutdown), it stops while loading and nothing changes; once the
model is loaded it runs to its end. Prompts tokenized while a swap ran are tokenized again for the
model that will run them (`Service._prepare`): a prompt's ids and fingerprint come from one model.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from semcache.cache.index import AgentCache
from semcache.engine.types import Engine
from semcache.ops.errors import ApiError, Kind
from semcache.scheduler.scheduler import Scheduler
from semcache.service.model import ModelView


def settle_heap() -> None:
    """Move everything alive once loaded (model, tokenizer, templates) out of the collector's view:
    a full collection then scans only what requests allocate, instead of pausing the event loop for
    every object of the start-up heap (tens of ms here, more on a loaded machine)."""
    gc.unfreeze()  # after a swap, the old model's objects may go
    gc.collect()
    gc.freeze()


async def finish(aw: Any) -> Any:
    """Await `aw` to its end however often the caller is cancelled meanwhile, then pass the cancel on."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


class Models:
    """The engine's model as the request path sees it (`view`), and swaps to another one."""

    def __init__(self, engine: Engine, scheduler: Scheduler, cache: AgentCache | None):
        self.engine, self.scheduler, self.cache = engine, scheduler, cache
        self._view: ModelView | None = None  # made on first use, dropped when the model changes
        self._lock = asyncio.Lock()  # one swap at a time
        self._tasks: set[asyncio.Task] = set()  # in progress, their clients there or not
        self._settled = asyncio.Event()  # cleared during a swap: new prompts wait for it
        self._settled.set()

    @property
    def view(self) -> ModelView:
        """The loaded model's info, tokenizer, renderer and grammars, as one (the model must be loaded)."""
        if self._view is None:
            self._view = ModelView(self.engine)
        return self._view

    async def settled(self) -> None:
        """Until no swap is in progress."""
        await self._settled.wait()

    def current(self, view: ModelView) -> bool:
        """`view` is the model in place, and no swap is about to replace it."""
        return view is self._view and self._settled.is_set()

    async def swap(self, spec: str) -> float:
        """Swap to `spec`'s model; seconds it took. Raises (and the model in place stays) if it fails."""
        task = asyncio.create_task(self._swap(spec))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not asyncio.current_task().cancelling():  # by `end`, not our caller
                raise ApiError(Kind.UNAVAILABLE, "the server is shutting down: the model was not swapped",
                               retry_after=5) from None
            raise

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # seen: a swap whose client left may fail with nobody to tell

    async def _swap(self, spec: str) -> float:
        async with self._lock:
            start = time.perf_counter()
            self.scheduler.pause()
            self._settled.clear()
            try:
                await self.scheduler.wait_idle()
                prepared = await self.engine.prepare(spec)  # cancelled up to here, nothing has changed
                await finish(self._install(prepared))  # from here on, the swap runs to its end
            finally:
                self._settled.set()
                self.scheduler.resume()
            seconds = time.perf_counter() - start
            self.scheduler.metrics.model_load_seconds.set(getattr(self.engine, "load_seconds", None) or seconds)
            return seconds

    async def _install(self, prepared: Any) -> None:
        """The cache, then at once the engine and the renderer, change to the prepared model."""
        if self.cache is not None:
            await self.cache.switch(prepared.info.fingerprint, prepared.info.kv_layout)
        self.engine.install(prepared)
        self._view = None
        settle_heap()

    async def end(self) -> None:
        """Shutting down: a swap still loading its model stops there, and the model in place stays."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
