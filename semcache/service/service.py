"""The one seam between HTTP and the layers below: tokenize, check limits, queue, wait for a slot.

http/anthropic.py and http/openai.py turn their bodies into a `Generation` (service/request.py),
call `Service.start`, and render the Ticket's Sequence text and `Finished` event in their format.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from semcache.text.chat import ChatMessage, PromptRenderer
from semcache.ops.config import Config
from semcache.engine.types import Engine, ModelInfo, SamplingParams
from semcache.ops.errors import ApiError, Kind, invalid
from semcache.cache.index import ANON, AgentCache
from semcache.scheduler.scheduler import Overloaded, Scheduler, TooLarge
from semcache.scheduler.sequence import Finished, FinishReason, Sequence
from semcache.service.model import ModelView
from semcache.service.request import Generation, Ticket, charge, failure, hit_type, refusal
from semcache.service.status import snapshot
from semcache.service.swap import Models
from semcache.service.turns import Turns
from semcache.text.reasoning import ThinkSplitter, opens_thinking, reasoned
from semcache.text.tools import Tool, ToolFormat

# What the HTTP layer may know of the layers below, handed on here: the service is its only seam.
__all__ = ["ANON", "FinishReason", "Finished", "Generation", "ModelInfo", "SamplingParams", "Sequence", "Service",
           "Ticket", "charge", "failure", "hit_type", "refusal"]



class Service:
    """What handlers need from the layers below, in one place (lives under an AppKey)."""

    def __init__(self, config: Config, engine: Engine, scheduler: Scheduler, cache: AgentCache | None = None,
                 limiter: Any = None):
        self.config = config
        self.engine = engine
        self.scheduler = scheduler
        self.cache = cache
        self.limiter = limiter  # ratelimit.RateLimiter, charged here: a limited request never queues
        self.models = Models(engine, scheduler, cache)
        self.turns = Turns(self)
        self.started = time.monotonic()

    # What the HTTP layer reads and asks for -------------------------------------------------

    @property
    def info(self) -> ModelInfo | None:
        return self.engine.info

    @property
    def load_seconds(self) -> float:
        """How long the model took to load (0 for an engine that does not say)."""
        return getattr(self.engine, "load_seconds", 0.0) or 0.0

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def draining(self) -> bool:
        return self.scheduler.draining

    @property
    def queue_full(self) -> bool:
        return self.scheduler.queue_full

    @property
    def has_cache(self) -> bool:
        return self.cache is not None

    def turn_done(self, ticket: Ticket, gen: Generation, reply: ChatMessage) -> None:
        """A turn was answered with `reply`: keep its canonical form cached for the next turn."""
        self.turns.after(ticket, gen, reply)

    def start_draining(self) -> None:
        """Refuse every new request from now on (the daemon is shutting down)."""
        self.scheduler.start_draining()

    def stop(self, seq: Sequence) -> None:
        """Stop `seq` now (the client went away, or a repeated tool call ended it); its KV is kept."""
        self.scheduler.abort(seq)

    def agents(self, tenant: str, agent: str | None = None) -> list:
        """The tenant's cache entries (one agent's, with `agent`), newest use first."""
        return self.cache.agents(tenant, agent) if self.cache is not None else []

    def status(self, tenant: str | None) -> dict:
        """The model, queue, cache tiers and agents as `tenant` may see them (None: all tenants)."""
        return {**snapshot(self, tenant), "uptime_seconds": round(time.monotonic() - self.started, 1)}

    async def delete_agent(self, tenant: str, agent: str) -> int:
        return await self.cache.delete(tenant, agent) if self.cache is not None else 0

    async def evict_agent(self, tenant: str, agent: str) -> list:
        return await self.cache.evict(tenant, agent) if self.cache is not None else []

    async def purge_tenant(self, tenant: str) -> int:
        return await self.cache.purge(tenant) if self.cache is not None else 0

    # The request path -----------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.engine.info is not None and self.scheduler.ready

    @property
    def model_id(self) -> str:
        return self.engine.info.model_id if self.engine.info else "loading"

    def require_loaded(self) -> None:
        if not self.loaded:
            raise ApiError(Kind.OVERLOADED, "the model is still loading", retry_after=2)

    async def tokenize(self, messages: list[ChatMessage], continue_final: bool = False,
                       generate: bool = True, tools: list[Tool] | tuple[Tool, ...] = (),
                       view: ModelView | None = None) -> list[int]:
        """Prompt ids for `messages` (rendered off the event loop: prompts can be megabytes), by
        `view`'s model (default: the current one). Without `generate`, the assistant turn is not
        opened (a prefix of any next turn's prompt)."""
        renderer = (view or self.view).renderer
        return await self._render(renderer.render, messages, continue_final, generate, list(tools))

    @property
    def reasons(self) -> bool:
        """The model thinks before it answers (its template knows <think> tags)."""
        return self.view.reasons

    def deltas(self, seq: Sequence):
        """The answer's text deltas; a reasoning model's thinking comes as Thinking pieces."""
        if not self.reasons:
            return seq.stream()
        prompt_tail = self.engine.tokenizer.decode(seq.prompt_ids[-8:])
        return reasoned(seq.stream(), ThinkSplitter(inside=opens_thinking(prompt_tail)))

    @property
    def tool_format(self) -> ToolFormat:
        return self.renderer.tool_format

    @property
    def renderer(self) -> PromptRenderer:
        return self.view.renderer

    @property
    def view(self) -> ModelView:
        """The loaded model's info, tokenizer, renderer and grammars, as one."""
        self.require_loaded()
        return self.models.view

    async def _render(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except ApiError:
            raise
        except Exception as exc:  # jinja templates raise on histories they do not accept
            raise invalid(f"the chat template rejected these messages: {exc}", param="messages") from None

    async def start(self, gen: Generation, warm: bool = False) -> Ticket:
        """Queue the generation and wait for its slot; the caller must `release` the ticket when done.
        With `warm`, only prefill the conversation (no assistant turn opened) for the agent cache."""
        try:
            self.scheduler.reserve()  # a full queue refuses before any template work
        except Overloaded as exc:
            raise refusal(exc) from None
        try:
            ticket = await self._prepare(gen, warm)
        finally:
            self.scheduler.unreserve()
        seq = ticket.seq
        try:
            self.scheduler.submit(seq)
            await self.scheduler.wait_admitted(seq)
        except BaseException as exc:
            self.release(ticket)  # refused: nothing was used, the rate-limit charge comes back
            if isinstance(exc, Overloaded):
                raise refusal(exc) from None
            if isinstance(exc, TooLarge):
                raise invalid(str(exc), param="max_tokens") from None
            raise
        if seq.finished is not None and seq.finished.reason is FinishReason.ABORT:
            self.release(ticket)
            raise failure(seq.finished)  # refused while queued: still a plain HTTP error, not a stream
        return ticket

    async def _prepare(self, gen: Generation, warm: bool) -> Ticket:
        """Tokenize (with the model that will run it), check the context, charge the rate limit."""
        while True:
            await self.models.settled()
            view = self.view
            ticket = await self._ticket(gen, warm, view)
            await self.models.settled()  # a swap begun meanwhile ends first
            if self.models.current(view):
                break  # else the model was swapped under this prompt: tokenize it for the new one
        if warm:
            ticket.stored = self.scheduler.when_stored(ticket.seq)
        if self.limiter is not None and gen.rate_key is not None:
            # The prompt and the first step of output up front; the rest as generated (at settle).
            first = min(ticket.seq.max_output, self.scheduler.limits.kv_grow_tokens)
            ticket.grant = charge(self.limiter, gen.rate_key, ticket.seq.num_prompt_tokens + first)
        return ticket

    async def _ticket(self, gen: Generation, warm: bool, view: ModelView) -> Ticket:
        """The generation's sequence, every part of it from `view`'s model: ids, context, fingerprint."""
        prompt_ids = await self.tokenize(gen.messages, gen.continue_final, generate=not warm, tools=gen.tools,
                                         view=view)
        context = view.info.context_length
        if len(prompt_ids) >= context:
            # Anthropic's exact words: Claude Code matches the whole message to tell the user the
            # conversation no longer fits (and to offer compaction). M leaves one token to generate.
            raise invalid(f"prompt is too long: {len(prompt_ids)} tokens > {context - 1} maximum", param="messages")
        if warm and len(prompt_ids) < self.config.cache_min_prefix:  # it could never be hit: not stored
            raise invalid(f"too short to cache: {len(prompt_ids)} tokens < cache_min_prefix "
                          f"({self.config.cache_min_prefix})", param="messages")
        seq = Sequence(
            prompt_ids=prompt_ids,
            max_tokens=min(gen.max_tokens, self.config.max_output_tokens or gen.max_tokens),
            context_length=context,
            sampling=replace(gen.sampling, constraint=None if warm else await view.constraint(gen)),
            stop=gen.stop,
            priority=gen.priority,
            tenant=gen.tenant,
            agent=gen.agent,
            background=gen.background,
            fresh_start=gen.fresh_start,
            fingerprint=view.info.fingerprint,
        )
        ticket = Ticket(seq)
        if gen.breakpoint:
            ticket.cache_breakpoint = await self._render(view.renderer.count_prefix, gen.messages, gen.breakpoint,
                                                         list(gen.tools))
        return ticket

    async def swap_model(self, spec: str) -> float:
        """Load another model: new requests wait in the queue, running ones finish, then the swap;
        this model's caches stay on disk under its fingerprint. On failure the old model stays.
        A caller cancelled meanwhile (its client went away) leaves the swap to end whole."""
        if self.scheduler.draining:
            raise ApiError(Kind.UNAVAILABLE, "the server is shutting down", retry_after=5)
        return await self.models.swap(spec)

    def release(self, ticket: Ticket) -> None:
        """The handler is done with the request: stop it if still running; refund unused tokens."""
        seq = ticket.seq
        self.scheduler.abort(seq)
        if ticket.grant is not None:  # a request that never ran used nothing
            ran = seq.admitted_at is not None
            ticket.grant.settle(seq.num_prompt_tokens + seq.num_output_tokens if ran else 0)

