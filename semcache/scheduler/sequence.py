"""Sequence: one request's journey through the scheduler, and the events it sends back up."""

from __future__ import annotations

import asyncio
import enum
import itertools
from dataclasses import dataclass, field

from semcache.cache.entry import Entry
from semcache.engine.types import SamplingParams

_ids = itertools.count(1)


class Status(enum.Enum):
    NEW = "new"  # made, not submitted (or refused at submit)
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class FinishReason(enum.Enum):
    """Why generation ended; each dialect maps it (end_turn/stop, max_tokens/length, ...)."""

    END = "end"
    LENGTH = "length"  # max_tokens reached
    CONTEXT_WINDOW = "context_window"  # the model's context is full before max_tokens was reached
    STOP_SEQUENCE = "stop_sequence"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True)
class Finished:
    """The last event of a sequence."""

    reason: FinishReason
    stop_sequence: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """A request as the scheduler sees it: prompt ids in, text deltas and one Finished event out."""

    prompt_ids: list[int]
    max_tokens: int  # as asked (after the operator's ceiling); the context may end it first
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    priority: int = 0
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.NEW
    output_ids: list[int] = field(default_factory=list)
    finished: Finished | None = None
    arrival: float = 0.0
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    tenant: str = "default"
    fingerprint: str | None = None  # the model its prompt was tokenized for
    context_length: int | None = None  # of that model (None: no limit but max_tokens)
    agent: str | None = None  # X-Agent-ID; None: an anonymous request (still gets prefix reuse)
    background: bool = False  # a client's side request: its cache entry is evicted first
    fresh_start: bool = False  # the client compacted its context: its entry replaces all the agent's
    num_cached_tokens: int = 0  # prompt tokens served from the agent cache
    cache_entry: Entry | None = None  # the agent cache entry of its hit (quarantined if the engine fails on it)
    cache_from_disk: bool = False
    num_cache_waits: int = 0
    kv_tokens: int = 0  # tokens of KV reserved for it while it runs (grows as it generates)
    num_preemptions: int = 0  # times it was paused to free KV and resumed from its stored KV
    epoch: int = 0  # Deletions.count when its request started: a later deletion of its agent wins
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    admitted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def feed_ids(self) -> list[int]:
        """What the engine must hold to continue it: the prompt, then everything generated (after a
        preemption the last sampled token is not in its KV yet, so it is fed again)."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def max_output(self) -> int:
        """The most tokens this sequence can generate: max_tokens, or what the context leaves."""
        if self.context_length is None:
            return self.max_tokens
        return min(self.max_tokens, max(0, self.context_length - self.num_prompt_tokens))

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def is_done(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED)

    def sort_key(self) -> tuple[int, float, int]:
        return (self.priority, self.arrival, self.seq_id)

    async def stream(self):
        """Yield text deltas until the sequence ends; then `self.finished` says why."""
        while True:
            event = await self.events.get()
            if isinstance(event, Finished):
                return
            yield event

    async def text(self) -> str:
        return "".join([delta async for delta in self.stream()])
