"""What a request is to the service: the dialect-neutral `Generation` a handler asks for, the
`Ticket` it holds while the request runs, and the API errors for refusals and failures."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from semcache.engine.types import SamplingParams
from semcache.ops.errors import ApiError, Kind, invalid
from semcache.ops.ratelimit import Grant, RateLimited, RateLimiter
from semcache.scheduler.scheduler import Overloaded
from semcache.scheduler.sequence import Finished, FinishReason, Sequence
from semcache.text.chat import ChatMessage
from semcache.text.tools import Tool, ToolChoice


@dataclass(frozen=True)
class Generation:
    """What both dialects ask for, once decoded."""

    messages: list[ChatMessage]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    priority: int = 5
    continue_final: bool = False  # a trailing assistant message is a prefill to continue
    tenant: str = "default"
    agent: str | None = None
    background: bool = False  # a client's side request (titles, classifiers, summaries)
    fresh_start: bool = False  # the client compacted its context
    breakpoint: list[ChatMessage] | None = None  # the conversation up to its last cache_control mark
    rate_key: str | None = "anonymous"  # whose rate-limit buckets pay for it (None: the server's own work)
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    json_mode: bool = False  # OpenAI response_format: the answer is JSON (matching json_schema if set)
    json_schema: dict | None = None
    epoch: int | None = None  # deletions seen when the request started (None: now); scheduler/deletions.py


def charge(limiter: RateLimiter, key: str, tokens: int, requests: int = 1) -> Grant:
    """Take `requests` and `tokens` from the key's buckets, or raise the dialect-neutral ApiError
    (429 with Retry-After; 400 for a request that could never fit the token budget)."""
    try:
        return limiter.acquire(key, tokens, requests)
    except RateLimited as exc:
        if exc.never:
            raise invalid(exc.message, param="max_tokens") from None
        raise ApiError(Kind.RATE_LIMIT, f"rate limit exceeded: {exc.message}",
                       retry_after=max(1, math.ceil(exc.retry_after))) from None


def too_long(tokens: int, context: int) -> ApiError:
    """A prompt past the context: Anthropic's exact words (Claude Code matches the whole message to
    tell the user the conversation no longer fits, and to offer compaction); the maximum leaves one
    token to generate. A prompt refused by its length alone, untokenized, states its floor."""
    return invalid(f"prompt is too long: {tokens} tokens > {context - 1} maximum", param="messages")


def failure(finished: Finished) -> ApiError:
    """The API error for a sequence that ended without an answer (aborted by the server, or failed).
    An abort with a message is the daemon shutting down: 503 in both dialects."""
    if finished.reason is FinishReason.ABORT and finished.error:
        return ApiError(Kind.UNAVAILABLE, finished.error, retry_after=5)
    if finished.reason is FinishReason.ABORT:
        return ApiError(Kind.OVERLOADED, "the request was cancelled by the server", retry_after=5)
    return ApiError(Kind.INTERNAL, finished.error or "generation failed")


def hit_type(seq: Sequence) -> str:
    """Where the reused prompt prefix came from: `memory` or `disk` (the entry's tier when the
    request was admitted), or `miss` when nothing was reused."""
    if not seq.num_cached_tokens:
        return "miss"
    return "disk" if seq.cache_from_disk else "memory"


def refusal(exc: Overloaded) -> ApiError:
    """A capacity refusal: 529/503 overloaded, or 503 unavailable while the daemon shuts down."""
    kind = Kind.UNAVAILABLE if exc.unavailable else Kind.OVERLOADED
    return ApiError(kind, f"overloaded: {exc}", retry_after=exc.retry_after)


@dataclass(eq=False)
class Ticket:
    """One request as its handler holds it: the scheduler's Sequence, plus what only the request
    layer needs (the rate-limit charge, the Anthropic cache_control breakpoint, and for a warm-up
    the future of its stored cache entry)."""

    seq: Sequence
    grant: Grant | None = None
    cache_breakpoint: int = 0  # prompt tokens up to the request's last cache_control mark
    stored: asyncio.Future | None = None
