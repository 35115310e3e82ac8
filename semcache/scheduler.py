"""The scheduler loop: admit queued sequences within budgets, step the engine, route tokens back.

Requests wait for capacity rather than fail: the only refusals are a full queue, a passed queue
deadline, and a model that is not loaded yet (or a daemon that is draining), all as `Overloaded`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

from semcache.batch import Admission
from semcache.chat import Detokenizer, StopMatcher
from semcache.engine import Engine
from semcache.kvcache import MISS, AgentCache, Match
from semcache.metrics import Metrics
from semcache.sequence import Finished, FinishReason, Sequence, Status

log = logging.getLogger("semcache.scheduler")
# A request whose cache entry is loading from disk lets others pass this many times, then runs cold.
MAX_CACHE_WAITS = 50


class Overloaded(Exception):
    """Capacity refused the request; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int, unavailable: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.unavailable = unavailable  # the daemon is shutting down, not just busy


class TooLarge(ValueError):
    """The request can never run here (context or KV budget); a client error, not overload."""


@dataclass(frozen=True)
class Limits:
    max_active: int = 16
    kv_budget: int = 4 << 30
    max_queue: int = 256
    max_queue_wait: float = 120.0
    stream_buffer: int = 4096
    batch_wait: float = 0.01


@dataclass(eq=False)
class _TextState:
    """Per running sequence text state: detokenizer and stop-string matcher."""

    detok: Detokenizer
    stops: StopMatcher


class Scheduler:
    """Owns the priority queue and the loop task; `submit` / `abort` are its whole public surface."""

    def __init__(self, engine: Engine, limits: Limits, cache: AgentCache | None = None,
                 clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None):
        self.engine = engine
        self.limits = limits
        self.cache = cache
        self.metrics = metrics or Metrics()
        self.paused = False  # a model swap: admit nothing, let the running finish
        self.clock = clock
        self.queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self.ready = False
        self.draining = False
        self._waiting: list[tuple[tuple, Sequence]] = []
        self._num_waiting = 0
        self._running: dict[int, Sequence] = {}
        self._text: dict[int, _TextState] = {}
        self._release: list[int] = []
        self._keep: dict[int, Sequence] = {}  # released sequences whose KV goes to the agent cache
        self._wake = asyncio.Event()  # a request arrived, or a cache entry finished loading
        self._stepping = False  # an engine step is in flight (its results not yet handed out)
        self._kv_reserved = 0
        self.num_steps = 0

    # Public surface -------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def queue_full(self) -> bool:
        return self._num_waiting >= self.limits.max_queue

    def kv_need(self, seq: Sequence) -> int:
        info = self.engine.info
        return (seq.num_prompt_tokens + seq.max_tokens) * (info.kv_bytes_per_token if info else 0)

    def check_fits(self, seq: Sequence) -> None:
        """Raise TooLarge when `seq` could never be admitted, so it fails now, not at its deadline."""
        need = self.kv_need(seq)
        if need > self.limits.kv_budget:
            raise TooLarge(
                f"prompt ({seq.num_prompt_tokens} tokens) plus max_tokens ({seq.max_tokens}) needs "
                f"{need} bytes of KV cache, more than kv_budget ({self.limits.kv_budget} bytes)"
            )

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one generation round per queue 'wave'."""
        waves = self._num_waiting / max(1, self.limits.max_active)
        return int(min(30, max(1, math.ceil(2 * waves))))

    def submit(self, seq: Sequence) -> None:
        """Queue `seq` or raise Overloaded at once; never blocks."""
        if self.draining:
            raise Overloaded("the server is shutting down", 5, unavailable=True)
        if not self.ready:
            raise Overloaded("the model is still loading", 2)
        if self.queue_full:
            raise Overloaded(f"the queue is full ({self.limits.max_queue} waiting)", self.retry_after())
        self.check_fits(seq)
        seq.arrival = self.clock()
        seq.status = Status.WAITING
        self._num_waiting += 1
        self.metrics.queue_depth.set(self._num_waiting)
        self.queue.put_nowait((seq.sort_key(), seq))
        self._wake.set()
        self._lookup(seq)  # an entry on disk starts loading while the request waits

    async def wait_admitted(self, seq: Sequence) -> None:
        """Wait until `seq` runs; past max_queue_wait abort it and raise Overloaded."""
        remaining = seq.arrival + self.limits.max_queue_wait - self.clock()
        try:
            await asyncio.wait_for(asyncio.shield(seq.admitted), timeout=max(0.0, remaining))
        except asyncio.TimeoutError:
            self.abort(seq)
            raise Overloaded(
                f"the request waited {self.limits.max_queue_wait:g} s in the queue", self.retry_after()
            ) from None

    def abort(self, seq: Sequence) -> None:
        """Stop `seq` wherever it is; its slot is free before the next engine step. Idempotent."""
        if seq.is_done:
            return
        if seq.status is Status.WAITING:
            self._num_waiting -= 1
            self.metrics.queue_depth.set(self._num_waiting)
        self._finish(seq, Finished(FinishReason.ABORT), Status.ABORTED)

    def resume(self) -> None:
        """Admit again after a pause (a model swap)."""
        self.paused = False
        self._wake.set()

    def refuse_waiting(self, message: str) -> None:
        """Draining: every queued request ends now (its caller gets a 503 with Retry-After)."""
        self._drain_queue()
        for _, seq in list(self._waiting):
            if not seq.is_done:
                self._num_waiting -= 1
                self._finish(seq, Finished(FinishReason.ABORT, error=message), Status.ABORTED)
        self.metrics.queue_depth.set(self._num_waiting)

    def abort_running(self, message: str) -> None:
        """End every running sequence as refused by the server (overloaded, not a server error)."""
        for seq in list(self._running.values()):
            self._finish(seq, Finished(FinishReason.ABORT, error=message), Status.ABORTED)

    async def wait_idle(self, poll: float = 0.01) -> None:
        """Until nothing runs and every finished sequence's cache has been handed over."""
        while self._running or self._release or self._keep or self._stepping:
            await asyncio.sleep(poll)

    def check_integrity(self) -> None:
        """Assert the bookkeeping invariants (tests call this before every step and when done)."""
        queued = [seq for _, seq in list(self._waiting) + list(self.queue._queue)]  # type: ignore[attr-defined]
        assert self._num_waiting == sum(1 for seq in queued if not seq.is_done), "num_waiting drifted"
        assert all(seq.status is Status.RUNNING for seq in self._running.values())
        assert self._kv_reserved == sum(self.kv_need(seq) for seq in self._running.values()), "KV drifted"
        assert set(self._text) == set(self._running), "text state for a sequence that is not running"
        assert self._kv_reserved <= self.limits.kv_budget and len(self._running) <= self.limits.max_active

    # The loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Block on the queue only when nothing runs; otherwise admit, step, route, retire."""
        while True:
            if not self._running and not self._waiting and not self._release:
                self._push(await self.queue.get())
                # Waking from idle: requests of a burst arrive a few ms apart; a short wait lets
                # them prefill as one group instead of one alone and the rest a step later.
                await asyncio.sleep(self.limits.batch_wait)
            self._wake.clear()
            self._drain_queue()
            admit = self._admit()
            release, self._release = self._release, []
            if not admit and not self._running and not release:
                if self._waiting:  # everything waiting is loading its cache from disk
                    await self._wake.wait()
                continue
            keep, self._keep = self._keep, {}
            started = time.perf_counter()
            self._stepping = True
            try:
                tokens, kept = await self.engine.step(admit, release, list(keep))
            except Exception as exc:  # an engine failure ends the sequences it touched, not the loop
                log.exception("engine step failed")
                self._fail_running(f"engine error: {exc}")
                tokens, kept = {}, {}
            finally:
                self._stepping = False
            self._store(keep, kept)
            self.num_steps += 1
            m = self.metrics
            m.step_seconds.observe(time.perf_counter() - started)
            m.queue_depth.set(self._num_waiting)
            m.active.set(len(self._running))
            m.sample_process()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("step %d: %.1f ms, admitted %d, released %d, running %d, waiting %d",
                          self.num_steps, (time.perf_counter() - started) * 1000, len(admit), len(release),
                          len(self._running), self._num_waiting)
            for seq_id, token in tokens.items():
                seq = self._running.get(seq_id)
                if seq is not None:
                    self._on_token(seq, token)

    def _store(self, keep: dict[int, Sequence], kept: dict) -> None:
        """Give finished sequences' KV (prompt and reply) to the agent cache."""
        for seq_id, seq in keep.items():
            data = kept.get(seq_id)
            entry = self.cache.put(seq.tenant, seq.agent, seq.prompt_ids + seq.output_ids, data) if data else None
            if seq.on_stored is not None and not seq.on_stored.done():
                seq.on_stored.set_result(entry)

    def _push(self, item: tuple[tuple, Sequence]) -> None:
        heapq.heappush(self._waiting, item)

    def _drain_queue(self) -> None:
        while True:
            try:
                self._push(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    def _lookup(self, seq: Sequence) -> Match | None:
        """The sequence's cache match once resident; None while its entry loads from disk."""
        if self.cache is None:
            return MISS
        match = self.cache.lookup(seq.tenant, seq.agent, seq.prompt_ids)
        if match.entry is None:
            return match
        loading = self.cache.fetch(match.entry)
        if loading is None:
            return match
        seq.cache_from_disk = True
        loading.add_done_callback(lambda _: self._wake.set())
        return None

    def _admit(self) -> list[Admission]:
        """Pop waiting sequences in priority order while slots and KV budget allow. Only a sequence
        whose cache entry is still loading from disk is passed over (a few times at most)."""
        admitted: list[Admission] = []
        loading: list[tuple[tuple, Sequence]] = []
        while self._waiting and not self.paused:
            _, seq = self._waiting[0]
            if seq.is_done:
                heapq.heappop(self._waiting)
                continue
            if seq.fingerprint is not None and seq.fingerprint != self.engine.info.fingerprint:
                self.abort(seq)  # tokenized for a model that was swapped out while it waited
                continue
            need = self.kv_need(seq)
            if len(self._running) >= self.limits.max_active or self._kv_reserved + need > self.limits.kv_budget:
                break
            match = self._lookup(seq)
            if match is None and seq.num_cache_waits < MAX_CACHE_WAITS:
                seq.num_cache_waits += 1
                loading.append(heapq.heappop(self._waiting))
                continue
            match = match or MISS
            heapq.heappop(self._waiting)
            self._num_waiting -= 1
            self._kv_reserved += need
            seq.status = Status.RUNNING
            seq.admitted_at = self.clock()
            self.metrics.queue_wait.observe(seq.admitted_at - seq.arrival)
            self.metrics.prompt_tokens.inc(seq.num_prompt_tokens)
            self._running[seq.seq_id] = seq
            tokenizer = self.engine.tokenizer
            self._text[seq.seq_id] = _TextState(Detokenizer(tokenizer), StopMatcher(seq.stop))
            if not seq.admitted.done():
                seq.admitted.set_result(None)
            admitted.append(Admission(seq.seq_id, seq.prompt_ids, seq.sampling, self._prefix(seq, match)))
        for item in loading:
            self._push(item)
        return admitted

    def _prefix(self, seq: Sequence, match: Match):
        if self.cache is None:
            return None
        self.cache.record(match, seq.num_prompt_tokens, seq.cache_from_disk)
        seq.num_cached_tokens = match.num_tokens
        return match.entry.data.prefix(match.num_tokens) if match.entry is not None else None

    def _on_token(self, seq: Sequence, token: int) -> None:
        now = self.clock()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
        elif seq.last_token_at is not None:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if seq.max_tokens <= 0:
            return self._finish(seq, Finished(FinishReason.LENGTH))
        seq.output_ids.append(token)
        text = self._text[seq.seq_id]
        if token in self.engine.info.eos_token_ids:
            return self._finish(seq, Finished(FinishReason.END))
        delta, stop = text.stops.feed(text.detok.add(token))
        self._emit(seq, delta)
        if stop is not None:
            return self._finish(seq, Finished(FinishReason.STOP_SEQUENCE, stop_sequence=stop))
        at_context = seq.num_prompt_tokens + seq.num_output_tokens >= self.engine.info.context_length
        if seq.num_output_tokens >= seq.max_tokens or at_context:
            return self._finish(seq, Finished(FinishReason.LENGTH))
        if seq.events.qsize() > self.limits.stream_buffer:
            self._finish(seq, Finished(FinishReason.ERROR, error="the client is reading too slowly"))

    def _emit(self, seq: Sequence, delta: str) -> None:
        if delta:
            seq.events.put_nowait(delta)

    def _finish(self, seq: Sequence, finished: Finished, status: Status = Status.FINISHED) -> None:
        text = self._text.pop(seq.seq_id, None)
        if text is not None and finished.reason in (FinishReason.END, FinishReason.LENGTH):
            tail, stop = text.stops.feed(text.detok.flush())
            self._emit(seq, tail + (text.stops.flush() if stop is None else ""))
        if self._running.pop(seq.seq_id, None) is not None:
            self.metrics.duration.observe(self.clock() - seq.arrival)
            self.metrics.generated_tokens.inc(seq.num_output_tokens)
            self._kv_reserved -= self.kv_need(seq)
            self._release.append(seq.seq_id)
            if self.cache is not None and finished.reason is not FinishReason.ERROR:
                self._keep[seq.seq_id] = seq
        seq.status = status
        seq.finished = finished
        seq.events.put_nowait(finished)
        if not seq.admitted.done():
            seq.admitted.set_result(None)

    def _fail_running(self, message: str) -> None:
        for seq in list(self._running.values()):
            self._finish(seq, Finished(FinishReason.ERROR, error=message))
