"""The one seam between HTTP and the layers below: tokenize, check limits, queue, wait for a slot.

http/anthropic.py and http/openai.py turn their bodies into a `Generation` (service/request.py),
call `Service.start`, and render the Ticket's Sequence text and `Finished` event in their format.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from semcache.text.chat import ChatMessage, PromptRenderer, PromptTooLong
from semcache.ops.config import Config
from semcache.engine.types import Engine, ModelInfo, SamplingParams
from semcache.ops.errors import ApiError, Kind, invalid
from semcache.cache.index import ANON, AgentCache
from semcache.scheduler.scheduler import Scheduler
from semcache.scheduler.sequence import Finished, FinishReason, Sequence
from semcache.service import choices
from semcache.service.model import ModelView
from semcache.service.request import Generation, Ticket, charge, failure, hit_type, refusal, too_long
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
        self.limiter = limiter  # ratelimit.RateLimiter: tokens charged in choices.py, before the queue
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
        self.scheduler.deletions.record(tenant, agent)  # first: what the agent has in flight stores nothing
        return await self.cache.delete(tenant, agent) if self.cache is not None else 0

    async def evict_agent(self, tenant: str, agent: str) -> list:
        return await self.cache.evict(tenant, agent) if self.cache is not None else []

    async def purge_tenant(self, tenant: str) -> int:
        self.scheduler.deletions.record(tenant)
        return await self.cache.purge(tenant) if self.cache is not None else 0

    def deleted(self, ticket: Ticket) -> bool:
        """The request's agent (or tenant) was deleted while it ran: its KV is not stored."""
        seq = ticket.seq
        return self.scheduler.deletions.covers(seq.epoch, seq.tenant, seq.agent)

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
                       view: ModelView | None = None, limit: int | None = None) -> list[int]:
        """Prompt ids for `messages` (rendered off the event loop: prompts can be megabytes), by
        `view`'s model (default: the current one). Without `generate`, the assistant turn is not
        opened (a prefix of any next turn's prompt). With `limit` (the context), a prompt whose
        length alone shows it cannot fit is a 400 before it is tokenized."""
        renderer = (view or self.view).renderer
        return await self._render(renderer.render, messages, continue_final, generate, list(tools), limit)

    async def count_tokens(self, messages: list[ChatMessage], tools: list[Tool]) -> int:
        """The prompt's tokens (Anthropic's count_tokens), within the limits generation has: a queue
        place while it is tokenized, and no tokenizing of a prompt far past the context."""
        choices.reserve(self.scheduler, 1)
        try:
            await self.models.settled()
            view = self.view
            return len(await self.tokenize(messages, continue_final=True, tools=tools, view=view,
                                           limit=view.info.context_length))
        finally:
            self.scheduler.unreserve()

    async def count_prefix(self, gen: Generation, view: ModelView) -> int:
        """Prompt tokens up to the request's last cache_control mark (its `breakpoint`)."""
        return await self._render(view.renderer.count_prefix, gen.messages, gen.breakpoint, list(gen.tools))

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
        except PromptTooLong as exc:
            raise too_long(exc.tokens, exc.limit) from None
        except Exception as exc:  # jinja templates raise on histories they do not accept
            raise invalid(f"the chat template rejected these messages: {exc}", param="messages") from None

    async def start(self, gen: Generation, warm: bool = False) -> Ticket:
        """Queue the generation and wait for its slot; the caller must `release` the ticket when done.
        With `warm`, only prefill the conversation (no assistant turn opened) for the agent cache."""
        return (await self.start_choices(gen, 1, warm))[0]

    async def start_choices(self, gen: Generation, n: int, warm: bool = False) -> list[Ticket]:
        """`n` choices of one prompt (OpenAI's n), all queued or none: rendered, tokenized, checked
        and compiled once (choices.py). A full queue refuses before any template work."""
        return await choices.start(self, gen, n, warm)

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

