"""From a Generation to queued sequences, cheapest checks first: queue places (a full queue refuses
before any template work), then the prompt, rendered and tokenized once however many choices are
asked for (a prompt whose length alone shows it cannot fit is refused before it is tokenized), the
context check, the grammar compiled once (each choice gets its own copy of its state), the tokens
charged, and the wait for admission. The request itself was charged on arrival (http/middleware.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from semcache.engine.types import ModelInfo, SamplingParams
from semcache.ops.errors import invalid
from semcache.scheduler.scheduler import Overloaded, Scheduler, TooLarge
from semcache.scheduler.sequence import FinishReason, Sequence
from semcache.service.request import Generation, Ticket, charge, failure, refusal, too_long

if TYPE_CHECKING:
    from semcache.service.service import Service


async def start(service: Service, gen: Generation, n: int, warm: bool) -> list[Ticket]:
    """`n` tickets for `gen`'s choices, all admitted, or none and the error; see Service.start."""
    scheduler = service.scheduler
    places = reserve(scheduler, n)
    try:
        tickets = await _prepare(service, gen, n, warm)
    finally:
        for _ in range(places):
            scheduler.unreserve()
    try:
        for ticket in tickets:
            scheduler.submit(ticket.seq)
        await _admitted(scheduler, [ticket.seq for ticket in tickets])
    except BaseException as exc:
        for ticket in tickets:
            service.release(ticket)  # refused: nothing was used, the token charge comes back
        if isinstance(exc, Overloaded):
            raise refusal(exc) from None
        if isinstance(exc, TooLarge):
            raise invalid(str(exc), param="max_tokens") from None
        raise
    aborted = next((t.seq.finished for t in tickets if t.seq.finished is not None
                    and t.seq.finished.reason is FinishReason.ABORT), None)
    if aborted is not None:
        for ticket in tickets:
            service.release(ticket)
        raise failure(aborted)  # refused while queued: still a plain HTTP error, not a stream
    return tickets


def reserve(scheduler: Scheduler, n: int) -> int:
    """Hold `n` queue places for a request still being prepared, or none and the refusal."""
    for held in range(n):
        try:
            scheduler.reserve()
        except Overloaded as exc:
            for _ in range(held):
                scheduler.unreserve()
            raise refusal(exc) from None
    return n


async def _admitted(scheduler: Scheduler, seqs: list[Sequence]) -> None:
    if len(seqs) == 1:  # no task: a refusal comes back in the same event-loop pass
        return await scheduler.wait_admitted(seqs[0])
    waits = await asyncio.gather(*(scheduler.wait_admitted(s) for s in seqs), return_exceptions=True)
    failed = next((w for w in waits if isinstance(w, BaseException)), None)
    if failed is not None:
        raise failed


async def _prepare(service: Service, gen: Generation, n: int, warm: bool) -> list[Ticket]:
    """Tokenize (with the model that will run it: a swap begun meanwhile ends first, and the
    prompt is tokenized again for the new model), check the context, compile the grammar, and make
    the choices' tickets, each charged its tokens."""
    epoch = service.scheduler.deletions.count if gen.epoch is None else gen.epoch
    while True:  # everything from one model view: ids, grammar, breakpoint, context, fingerprint
        await service.models.settled()
        view = service.view
        context = view.info.context_length
        prompt_ids = await service.tokenize(gen.messages, gen.continue_final, generate=not warm, tools=gen.tools,
                                            view=view, limit=context)
        if len(prompt_ids) >= context:
            raise too_long(len(prompt_ids), context)
        if warm and len(prompt_ids) < service.config.cache_min_prefix:  # it could never be hit: not stored
            raise invalid(f"too short to cache: {len(prompt_ids)} tokens < cache_min_prefix "
                          f"({service.config.cache_min_prefix})", param="messages")
        constraint = None if warm else await view.constraint(gen)
        breakpoint = await service.count_prefix(gen, view) if gen.breakpoint else 0
        await service.models.settled()
        if service.models.current(view):
            break
    tickets: list[Ticket] = []
    try:
        for i in range(n):
            sampling = _choice(gen.sampling, i, constraint)
            tickets.append(_ticket(service, view.info, gen, prompt_ids, sampling, epoch, warm))
    except BaseException:
        for ticket in tickets:
            service.release(ticket)
        raise
    for ticket in tickets:
        ticket.cache_breakpoint = breakpoint
    return tickets


def _choice(sampling: SamplingParams, i: int, constraint: Any) -> SamplingParams:
    """Choice `i`'s sampling: a seeded request's choices get seed, seed+1, ...; each its own
    grammar state (the first the compiled one, the others copies)."""
    seed = None if sampling.seed is None else sampling.seed + i
    own = constraint.copy() if i and constraint is not None else constraint
    return replace(sampling, seed=seed, constraint=own)


def _ticket(service: Service, info: ModelInfo, gen: Generation, prompt_ids: list[int], sampling: SamplingParams,
            epoch: int, warm: bool) -> Ticket:
    """One choice: its Sequence (every part of it from the model `info` it was tokenized for),
    charged the prompt and the first step of output up front (the rest as generated, at settle)."""
    seq = Sequence(
        prompt_ids=prompt_ids,
        max_tokens=min(gen.max_tokens, service.config.max_output_tokens or gen.max_tokens),
        context_length=info.context_length,
        sampling=sampling,
        stop=gen.stop,
        priority=gen.priority,
        tenant=gen.tenant,
        agent=gen.agent,
        background=gen.background,
        fresh_start=gen.fresh_start,
        fingerprint=info.fingerprint,
        epoch=epoch,
    )
    ticket = Ticket(seq)
    if service.limiter is not None and gen.rate_key is not None:
        first = min(seq.max_output, service.scheduler.limits.kv_grow_tokens)
        ticket.grant = charge(service.limiter, gen.rate_key, len(prompt_ids) + first, requests=0)
    if warm:
        ticket.stored = service.scheduler.when_stored(seq)
    return ticket
