"""Anthropic Messages API: /v1/messages (+SSE stream) and /v1/messages/count_tokens."""

from __future__ import annotations

import secrets

from aiohttp import web

from semcache.http import sse
from semcache.http.anthropic_request import (  # noqa: F401  (re-exported: agents.py, tests)
    CountTokensRequest,
    Message,
    MessagesRequest,
    TextBlock,
    breakpoint_messages,
    chat_messages,
    count_decoder,
    messages_decoder,
    parse_tools,
)
from semcache.ops.errors import anthropic_body
from semcache.http.identity import caller, note_admitted, note_usage
from semcache.http.appkeys import SERVICE
from semcache.http.body import decode_body, stop_strings
from semcache.service.service import FinishReason, Generation, SamplingParams, Sequence, Ticket, failure
from semcache.http.anthropic_blocks import Blocks, content
from semcache.text.chat import reply_message
from semcache.text.tools import CallScanner, collect, scanned

STOP_REASONS = {
    FinishReason.END: "end_turn",
    FinishReason.LENGTH: "max_tokens",
    FinishReason.CONTEXT_WINDOW: "model_context_window_exceeded",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
}


def usage(ticket: Ticket) -> dict:
    """As the real API defines them, the three input counters add up to the prompt's tokens: read
    from the cache, written to it (not reused, up to the last cache_control mark), and the rest."""
    seq = ticket.seq
    read = seq.num_cached_tokens
    creation = max(0, min(ticket.cache_breakpoint, seq.num_prompt_tokens) - read)
    return {
        "input_tokens": seq.num_prompt_tokens - read - creation,
        "output_tokens": seq.num_output_tokens,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
    }


def _stop_reason(seq: Sequence, scanner: CallScanner | None) -> str | None:
    finished = seq.finished
    if scanner is not None and scanner.done:  # stopped at a repeated call
        return "tool_use"
    if finished is None:
        return None
    if scanner is not None and scanner.calls and finished.reason is FinishReason.END:
        return "tool_use"
    return STOP_REASONS.get(finished.reason)


def _message(body: MessagesRequest, msg_id: str, content: list, ticket: Ticket,
             scanner: CallScanner | None = None, final: bool = True) -> dict:
    """The Message object; message_start sends it with final=False (no stop reason yet)."""
    seq = ticket.seq
    finished = seq.finished if final else None
    final = final and (finished is not None or bool(scanner and scanner.done))
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": body.model,
        "content": content,
        "stop_reason": _stop_reason(seq, scanner) if final else None,
        "stop_sequence": finished.stop_sequence if finished else None,
        "usage": usage(ticket),
    }


async def messages(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    body = decode_body(await request.read(), messages_decoder)
    sampling = SamplingParams.from_request(body.temperature, body.top_p, body.top_k)
    who = caller(request, body.priority)
    tools, choice = parse_tools(body)
    gen = Generation(
        **who,
        messages=chat_messages(body),
        max_tokens=body.max_tokens,
        sampling=sampling,
        stop=stop_strings(body.stop_sequences, "stop_sequences"),
        continue_final=True,  # Anthropic "prefill": the answer continues a final assistant turn
        breakpoint=breakpoint_messages(body),
        tools=tuple(tools),
        tool_choice=choice,
    )
    ticket = await service.start(gen)
    seq = ticket.seq
    note_admitted(request, [seq])
    try:
        msg_id = "msg_" + secrets.token_hex(12)
        scanner = CallScanner(service.tool_format, tools, "toolu_") if tools else None
        if body.stream:
            response, events = await _stream(request, body, ticket, msg_id, scanner, service)
            if events is not None:
                service.turn_done(ticket, gen, reply_message(events))
            return response
        events = await collect(service.deltas(seq), scanner)
        if scanner and scanner.done:
            service.stop(seq)  # stopped at a repeated call: free the slot, keep the KV
        elif seq.finished.reason not in STOP_REASONS:
            raise failure(seq.finished)
        service.turn_done(ticket, gen, reply_message(events))
        blocks = content(events, service.info.fingerprint)
        return web.json_response(_message(body, msg_id, blocks, ticket, scanner))
    finally:
        note_usage(request, [seq])
        service.release(ticket)


async def _stream(request: web.Request, body: MessagesRequest, ticket: Ticket, msg_id: str,
                  scanner: CallScanner | None, service):
    """The SSE answer, and its events (None: it ended with an error event)."""
    response = await sse.open_stream(request)
    async with sse.KeepAlive(response, PING) as stream:
        events = await _events(stream.write, body, ticket, msg_id, scanner, service)
    if events is not None:
        await response.write_eof()
    return response, events


PING = sse.frame({"type": "ping"}, "ping")


async def _events(write, body: MessagesRequest, ticket: Ticket, msg_id: str, scanner: CallScanner | None,
                  service) -> list | None:
    """The whole event sequence, message_start to message_stop; the answer's events (thinking,
    text, calls), or None when it ended with an error event."""
    seq = ticket.seq
    start = _message(body, msg_id, [], ticket, final=False)
    await write(sse.frame({"type": "message_start", "message": start}, "message_start"))
    blocks = Blocks(write, service.info.fingerprint)
    if scanner is None and not service.reasons:
        await blocks.text("")  # plain text: the block opens at once, before the first token
    await write(PING)
    answer = []
    async for events in scanned(service.deltas(seq), scanner):
        answer += events
        await blocks.emit(events)
    finished = seq.finished
    if scanner and scanner.done:
        service.stop(seq)  # stopped at a repeated call: free the slot, keep the KV
    elif finished.reason not in STOP_REASONS:
        await write(sse.frame(anthropic_body(failure(finished)), "error"))
        return None
    await blocks.finish()
    await write(sse.frame(
        {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_reason(seq, scanner),
                      "stop_sequence": finished.stop_sequence if finished else None},
            "usage": usage(ticket),
        },
        "message_delta",
    ))
    await write(sse.frame({"type": "message_stop"}, "message_stop"))
    return answer


async def count_tokens(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = decode_body(await request.read(), count_decoder)
    tools, _ = parse_tools(body)
    return web.json_response({"input_tokens": await service.count_tokens(chat_messages(body), tools)})


def model_info(model_id: str, context_length: int) -> dict:
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id,
        "created_at": "2025-01-01T00:00:00Z",
        "lifecycle": "active",
        "max_input_tokens": context_length,
    }
