"""The scheduler loop: admit queued sequences within budgets, step the engine, route tokens back.

Two containers (nano-vllm's shape): `Waiting` (waiting.py: the priority queue and its places) and
`Running` (running.py: the batch, token routing, how sequences end). Requests wait for capacity
rather than fail: the only refusals are a full queue, a passed queue deadline, and a model that is
not loaded yet (or a daemon that is draining), all as `Overloaded`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable

from semcache.engine.types import Admission, Engine, StepResult
from semcache.cache.index import MISS, AgentCache
from semcache.ops.metrics import Metrics
from semcache.scheduler.cachelink import CacheLink
from semcache.scheduler.deletions import Deletions
from semcache.scheduler.kvbudget import KVBudget
from semcache.scheduler.limits import Limits, TooLarge
from semcache.scheduler.running import Running, kept_tokens
from semcache.scheduler.sequence import Finished, FinishReason, Sequence, Status
from semcache.scheduler.waiting import Item, Overloaded, Waiting

__all__ = ["Limits", "Overloaded", "Scheduler", "TooLarge"]

log = logging.getLogger("semcache.scheduler")
# A request whose cache entry is loading from disk lets others pass this many times, then runs cold.
MAX_CACHE_WAITS = 50


class Scheduler:
    """Owns the two containers and the loop task; reserve / submit / abort are its public surface."""

    def __init__(self, engine: Engine, limits: Limits, cache: AgentCache | None = None,
                 clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None):
        self.engine = engine
        self.limits = limits
        self.cache = cache
        self.metrics = metrics or Metrics()
        self.paused = False  # a model swap: admit nothing, let the running finish
        self.clock = clock
        self.ready = False
        self.draining = False
        self.waiting = Waiting()
        self.running = Running(self.metrics, clock, limits.stream_buffer, keep_kv=cache is not None)
        self.kv = KVBudget(limits, self.running, lambda: engine.info)
        self._wake = asyncio.Event()  # a request arrived, or a cache entry finished loading
        self.hits = CacheLink(cache, self._wake.set)
        self._stepping = False  # an engine step is in flight (its results not yet handed out)
        self._stored: dict[int, asyncio.Future] = {}  # seq_id -> resolved with its cache entry once stored
        self.deletions = Deletions()  # a sequence whose agent was deleted meanwhile stores nothing
        self.num_steps = 0

    # Public surface -------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return self.waiting.num_waiting

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def queue_full(self) -> bool:
        """max_queue requests wait beyond those the free batch slots take at the next step (so a
        burst at idle is accepted up to max_active + max_queue); reserved places count as waiting."""
        free = max(0, self.limits.max_active - len(self.running))
        return self.waiting.num_places >= self.limits.max_queue + free

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one generation round per queue 'wave'."""
        waves = self.num_waiting / max(1, self.limits.max_active)
        return int(min(30, max(1, math.ceil(2 * waves))))

    def reserve(self) -> None:
        """Hold a queue place for a request still being prepared (rendered and tokenized), or raise
        Overloaded at once. A refusal then costs no template work: in a burst, refused requests
        are answered before the accepted ones are tokenized. Give the place back with `unreserve`
        before `submit`."""
        self._check_open()
        self.waiting.reserve()

    def unreserve(self) -> None:
        self.waiting.unreserve()

    def submit(self, seq: Sequence) -> None:
        """Queue `seq` or raise Overloaded at once; never blocks."""
        self._check_open()
        self.kv.check(seq)  # TooLarge when it could never be admitted: it fails now, not at its deadline
        seq.arrival = self.clock()
        self.waiting.put(seq)
        self.metrics.queue_depth.set(self.num_waiting)
        self._wake.set()
        self.hits.lookup(seq)  # an entry on disk starts loading while the request waits

    def _check_open(self) -> None:
        if self.draining:
            raise Overloaded("the server is shutting down", 5, unavailable=True)
        if not self.ready:
            raise Overloaded("the model is still loading", 2)
        if self.queue_full:
            raise Overloaded(f"the queue is full ({self.limits.max_queue} waiting)", self.retry_after())

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

    def when_stored(self, seq: Sequence) -> asyncio.Future:
        """A future resolved with `seq`'s cache entry (None if it could not be stored) once its KV
        is in the agent cache; cancelled if `seq` is aborted first."""
        return self._stored.setdefault(seq.seq_id, asyncio.get_running_loop().create_future())

    def abort(self, seq: Sequence, error: str | None = None) -> None:
        """Stop `seq` wherever it is; its slot is free before the next engine step. Idempotent.
        With `error`, the server refused it (the caller reports a 503), not the client."""
        waiter = self._stored.get(seq.seq_id)
        if waiter is not None and (waiter.done() or not seq.is_done):
            del self._stored[seq.seq_id]
            waiter.cancel()
        if seq.is_done:
            return
        if seq.status is Status.WAITING:
            self.waiting.left(seq)
            self.metrics.queue_depth.set(self.num_waiting)
        self.running.end(seq, Finished(FinishReason.ABORT, error=error), Status.ABORTED)

    def open(self) -> None:
        """The model is loaded: accept requests."""
        self.ready = True

    def start_draining(self) -> None:
        """Refuse every new request from now on (the daemon is shutting down)."""
        self.draining = True

    def pause(self) -> None:
        """Admit nothing new (a model swap); running sequences finish."""
        self.paused = True

    def resume(self) -> None:
        """Admit again after a pause (a model swap)."""
        self.paused = False
        self._wake.set()

    def refuse_waiting(self, message: str) -> None:
        """Draining: every queued request ends now (its caller gets a 503 with Retry-After)."""
        self.waiting.drain()
        for seq in self.waiting.sequences():
            self.abort(seq, message)

    def abort_running(self, message: str) -> None:
        """End every running sequence as refused by the server (overloaded, not a server error)."""
        self.running.end_all(Finished(FinishReason.ABORT, error=message), Status.ABORTED)

    async def wait_idle(self, poll: float = 0.01) -> None:
        """Until nothing runs and every finished sequence's cache has been handed over."""
        running = self.running
        while running.seqs or running.release or running.keep or self._stepping:
            await asyncio.sleep(poll)

    def check_integrity(self) -> None:
        """Assert the bookkeeping invariants (tests call this before every step and when done)."""
        self.waiting.check_integrity()
        self.running.check_integrity()
        running = self.running.seqs.values()
        self.kv.check_integrity()
        assert len(running) <= self.limits.max_active

    # The loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Block on the queue only when nothing runs; otherwise admit, step, route, retire."""
        running = self.running
        while True:
            if not running.seqs and not self.waiting and not running.release:
                await self.waiting.arrival()
                # Waking from idle: requests of a burst arrive a few ms apart; a short wait lets
                # them prefill as one group instead of one alone and the rest a step later.
                await asyncio.sleep(self.limits.batch_wait)
            self._wake.clear()
            self.waiting.drain()
            admit = self._admit()
            release, running.release = running.release, []
            if not admit and not running.seqs and not release:
                if self.waiting:  # everything waiting is loading its cache from disk
                    await self._wake.wait()
                continue
            keep, running.keep = running.keep, {}
            result = await self._step(admit, release, keep)
            running.route(result, self.engine.info)
            self._grow()

    async def _step(self, admit: list[Admission], release: list[int], keep: dict[int, Sequence]) -> StepResult:
        """One engine step; the kept KV goes to the agent cache, and the hits the engine could not
        use to quarantine. An engine failure ends the sequences it touched, not the loop."""
        started = time.perf_counter()
        self._stepping = True
        try:
            result = await self.engine.step(admit, release, list(keep))
        except Exception as exc:
            log.exception("engine step failed")
            self.running.end_all(Finished(FinishReason.ERROR, error=f"engine error: {exc}"))
            result = StepResult({}, {})
        finally:
            self._stepping = False
        self.hits.reject(seq for i in result.rejected if (seq := self.running.seqs.get(i)) is not None)
        self._store(keep, result.kept)
        self.num_steps += 1
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.metrics.sample_process()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step %d: %.1f ms, admitted %d, released %d, running %d, waiting %d",
                      self.num_steps, (time.perf_counter() - started) * 1000, len(admit), len(release),
                      len(self.running), self.num_waiting)
        return result

    def _grow(self) -> None:
        """Reserve KV ahead for the running sequences; preempt the newest when the budget is spent."""
        preempt, stuck = self.kv.grow()
        for seq in preempt:  # waits again with its original arrival: first in line in its priority
            self.running.preempt(seq)
            seq.num_preemptions += 1
            self.waiting.put(seq)
            self.metrics.preemptions.inc()
        for seq in stuck:  # it alone fills kv_budget: for this daemon, its context is full
            self.running.end(seq, Finished(FinishReason.CONTEXT_WINDOW))
        self.metrics.queue_depth.set(self.num_waiting)

    def _store(self, keep: dict[int, Sequence], kept: dict) -> None:
        """Give finished sequences' KV (prompt and reply) to the agent cache."""
        for seq_id, seq in keep.items():
            deleted = self.deletions.covers(seq.epoch, seq.tenant, seq.agent)
            data = None if deleted else kept_tokens(kept.get(seq_id), len(seq.prompt_ids) + len(seq.output_ids))
            entry = self.cache.put(seq.tenant, seq.agent, seq.prompt_ids + seq.output_ids, data,
                                   seq.background, seq.fresh_start) if data else None
            waiter = self._stored.pop(seq_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(entry)

    def _admit(self) -> list[Admission]:
        """Take waiting sequences in priority order while slots and KV budget allow. Only a sequence
        whose cache entry is still loading from disk is passed over (a few times at most)."""
        admitted: list[Admission] = []
        passed: list[Item] = []
        while not self.paused and (seq := self.waiting.first()) is not None:
            if seq.fingerprint is not None and seq.fingerprint != self.engine.info.fingerprint:
                self.abort(seq)  # tokenized for a model that was swapped out while it waited
                continue
            if len(self.running) >= self.limits.max_active or not self.kv.fits(seq):
                break
            if seq.seq_id in self.running.keep or seq.agent is not None and any(
                    k.agent == seq.agent and k.tenant == seq.tenant for k in self.running.keep.values()):
                break  # its KV (its own, preempted, or its agent's last turn) is stored by this step
            match = self.hits.lookup(seq)
            if match is None and seq.num_cache_waits < MAX_CACHE_WAITS:
                seq.num_cache_waits += 1
                passed.append(self.waiting.pass_over())
                continue
            self.waiting.take()
            tokens = self.kv.tokens_for(seq)
            self.running.add(seq, tokens, self.kv.bytes(tokens), self.engine.tokenizer)
            admitted.append(Admission(seq.seq_id, seq.feed_ids, seq.sampling, self.hits.prefix(seq, match or MISS),
                                      max_new=seq.max_output - seq.num_output_tokens))
        for item in passed:
            self.waiting.push(item)
        self.metrics.queue_depth.set(self.num_waiting)
        return admitted
