"""After a turn: make sure the next turn can read back everything this one sent and received.

The next request sends the reply back as text, and the chat template renders it again. That text
may tokenize differently from the tokens generated: a sampled word split in two, a tool call written
back canonically, a stop string that is not part of the reply, a template that drops reasoning. The
stored entry then matches the next prompt only up to the first difference. When it differs, the
reply's canonical form is prefilled in the background, at the lowest priority, starting from the
cached prefix (only the differing tail is computed), and stored for the agent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from semcache.cache.entry import common_prefix
from semcache.scheduler.sequence import FinishReason
from semcache.service.request import Generation, Ticket
from semcache.text.chat import ChatMessage

log = logging.getLogger("semcache.turns")
ANSWERED = (FinishReason.END, FinishReason.LENGTH, FinishReason.STOP_SEQUENCE, FinishReason.CONTEXT_WINDOW)
HOUSEKEEPING_PRIORITY = 9  # the least urgent: never ahead of a client's request


class Turns:
    """Background prefills of canonical replies, owned by the service (cancelled on close)."""

    def __init__(self, service):
        self.service = service
        self.tasks: set[asyncio.Task] = set()
        self.num_canonical = 0  # prefills started (for tests and the closing report)

    def after(self, ticket: Ticket, gen: Generation, reply: ChatMessage) -> None:
        """`settle` in the background: the client's answer never waits for it."""
        task = asyncio.create_task(self.settle(ticket, gen, reply))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def settle(self, ticket: Ticket, gen: Generation, reply: ChatMessage) -> int | None:
        """Compare the reply as generated with its canonical form; start the prefill if they differ.
        Returns the divergence point (tokens into the stored entry), or None when they agree."""
        seq, service = ticket.seq, self.service
        # Only a named agent has a next turn to prepare for; the check costs one more render and
        # tokenization of the conversation (off the event loop).
        if service.cache is None or gen.agent is None or seq.finished is None or seq.finished.reason not in ANSWERED:
            return None
        history = [*gen.messages, reply]
        canonical = await service.tokenize(history, generate=False, tools=gen.tools)
        generated = seq.prompt_ids + seq.output_ids
        n = common_prefix(canonical, generated)
        metrics = service.scheduler.metrics
        metrics.replies_checked.inc()
        if n >= min(len(generated), len(canonical)):
            return None  # the next turn extends what is stored
        metrics.replies_retokenized.inc()
        metrics.reply_divergence.observe(max(0, n - seq.num_prompt_tokens))
        warm = replace(gen, messages=history, max_tokens=0, priority=HOUSEKEEPING_PRIORITY, rate_key=None,
                       continue_final=False, breakpoint=None, stop=(), fresh_start=False, epoch=seq.epoch)
        task = asyncio.create_task(self._prefill(warm))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.num_canonical += 1
        return n

    async def _prefill(self, warm: Generation) -> None:
        try:
            ticket = await self.service.start(warm, warm=True)
        except Exception as exc:  # a full queue, a swap, a shutdown: the next turn is just less warm
            log.debug("canonical reply not prefilled: %s", exc)
            return
        try:
            await ticket.seq.text()
            if ticket.stored is not None:
                await ticket.stored
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("canonical reply not stored: %s", exc)
        finally:
            self.service.release(ticket)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
