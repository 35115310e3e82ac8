"""OpenAI Chat Completions: /v1/chat/completions (+stream with include_usage)."""

from __future__ import annotations

import asyncio
import secrets
import time

from aiohttp import web

from semcache.http import sse
from semcache.ops.errors import invalid, openai_body
from semcache.http.identity import caller, note_admitted, note_usage
from semcache.http.appkeys import SERVICE
from semcache.http.openai_request import (  # noqa: F401  (re-exported: agents.py, tests)
    MAX_CHOICES,
    ChatRequest,
    Message,
    chat_decoder,
    chat_messages,
    check,
    parse_tools,
    response_json,
)
from semcache.http.body import decode_body, stop_strings
from semcache.service.service import FinishReason, Generation, SamplingParams, Sequence, failure
from semcache.text.chat import reply_message
from semcache.text.reasoning import Thinking
from semcache.text.tools import (
    CallScanner,
    Text,
    ToolCall,
    ToolChoice,
    collect,
)

FINISH_REASONS = {
    FinishReason.END: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CONTEXT_WINDOW: "length",
}


def usage(seqs: list[Sequence]) -> dict:
    """The prompt counts once however many choices were generated from it."""
    prompt = seqs[0].num_prompt_tokens
    completion = sum(seq.num_output_tokens for seq in seqs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": seqs[0].num_cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    body = decode_body(await request.read(), chat_decoder)
    check(body)
    max_tokens = body.max_completion_tokens or body.max_tokens or service.config.default_max_tokens
    stop = stop_strings(body.stop, "stop")
    sampling = SamplingParams.from_request(body.temperature, body.top_p, body.top_k, body.seed)
    who = caller(request, body.priority)
    tools, choice = parse_tools(body)
    json_mode, json_schema = response_json(body)
    gen = Generation(
        **who,
        messages=chat_messages(body),
        max_tokens=max_tokens,
        sampling=sampling,
        stop=stop,
        continue_final=body.continue_final_message,
        tools=tuple(tools),
        tool_choice=choice,
        json_mode=json_mode,
        json_schema=json_schema,
    )
    if body.n > service.config.max_active:
        raise invalid(f"n ({body.n}) is larger than max_active ({service.config.max_active})", param="n")
    tickets = await service.start_choices(gen, body.n)
    seqs = [t.seq for t in tickets]
    note_admitted(request, seqs)
    try:
        head = {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "created": int(time.time()),
            "model": body.model,
            "system_fingerprint": "fp_" + service.info.fingerprint[:10],
        }
        scanners = [CallScanner(service.tool_format, tools, "call_") if tools else None for _ in seqs]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            response, answer = await _stream(request, seqs, head, include_usage, scanners, choice, service)
            if answer is not None and len(tickets) == 1:
                service.turn_done(tickets[0], gen, reply_message(answer))
            return response
        answers = await asyncio.gather(*(_collect(seq, scanner, service)
                                         for seq, scanner in zip(seqs, scanners)))
        for seq, scanner in zip(seqs, scanners):
            if not (scanner and scanner.done) and seq.finished.reason not in FINISH_REASONS:
                raise failure(seq.finished)
        choices = [
            {
                "index": i,
                "message": _message(events, scanner),
                "logprobs": None,
                "finish_reason": _finish_reason(seq, scanner, choice),
            }
            for i, (seq, events, scanner) in enumerate(zip(seqs, answers, scanners))
        ]
        if len(tickets) == 1:  # with n > 1 the client continues from one choice it picks
            service.turn_done(tickets[0], gen, reply_message(answers[0]))
        return web.json_response({**head, "object": "chat.completion", "choices": choices, "usage": usage(seqs)})
    finally:
        note_usage(request, seqs)
        for ticket in tickets:
            service.release(ticket)


def _finish_reason(seq: Sequence, scanner: CallScanner | None, choice: ToolChoice) -> str:
    """"tool_calls" when the answer calls tools, except "stop" when tool_choice named the function
    (as the real API does)."""
    called = scanner is not None and (scanner.done or (scanner.calls and seq.finished.reason is FinishReason.END))
    if called:
        return "stop" if choice.mode == "tool" else "tool_calls"
    return FINISH_REASONS[seq.finished.reason]


def _function_call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json()}}


async def _collect(seq: Sequence, scanner: CallScanner | None, service) -> list:
    """The answer's events; a scanner that is done (a repeated call) stops the sequence early."""
    events = await collect(service.deltas(seq), scanner)
    if scanner is not None and scanner.done:
        service.stop(seq)
    return events


def _message(events: list, scanner: CallScanner | None) -> dict:
    content = "".join(e.text for e in events if isinstance(e, Text))
    thinking = "".join(e.text for e in events if isinstance(e, Thinking))
    reasoning = {"reasoning_content": thinking} if thinking else {}  # a reasoning model's thinking
    if scanner is None:
        return {"role": "assistant", "content": content, "refusal": None, **reasoning}
    message = {"role": "assistant", "content": content or (None if scanner.calls else ""), "refusal": None,
               **reasoning}
    if scanner.calls:
        message["tool_calls"] = [_function_call(c) for c in scanner.calls]
    return message


async def _merged(streams: list):
    """(choice index, delta) as any choice produces one; (index, None) when that choice ends."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, deltas) -> None:
        async for delta in deltas:
            queue.put_nowait((index, delta))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, deltas)) for i, deltas in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while True:
                index, delta = await queue.get()
                yield index, delta
                if delta is None:
                    break
    finally:
        for task in tasks:
            task.cancel()


def _deltas(events: list, scanner: CallScanner | None) -> list[dict]:
    """Chunk deltas for scanned events: text as content; a call as its first fragment (index, id,
    type, name, empty arguments), then its arguments."""
    out = []
    for event in events:
        if isinstance(event, Text):
            out.append({"content": event.text})
            continue
        call, index = event.call, scanner.calls.index(event.call)
        first = {"index": index, **_function_call(call)}
        first["function"] = {"name": call.name, "arguments": ""}
        out.append({"tool_calls": [first]})
        out.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments_json()}}]})
    return out


async def _stream(request: web.Request, seqs: list[Sequence], head: dict, include_usage: bool,
                  scanners: list[CallScanner | None], choice: ToolChoice, service):
    """The SSE answer, and the first choice's events (None: it ended with an error event)."""
    response = await sse.open_stream(request)
    answer: list = []
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse.frame({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    for index in range(len(seqs)):
        await response.write(chunk(index, {"role": "assistant", "content": ""}))
    stopped: set[int] = set()  # choices that ended at a repeated tool call
    async for index, delta in _merged([service.deltas(seq) for seq in seqs]):
        scanner = scanners[index]
        if index in stopped:
            continue
        if isinstance(delta, Thinking):  # a reasoning model's thinking, as DeepSeek's API sends it
            await response.write(chunk(index, {"reasoning_content": delta.text}))
            continue
        if delta is not None:
            events = scanner.feed(delta) if scanner else [Text(delta)]
            answer += events if index == 0 else []
            for piece in _deltas(events, scanner):
                await response.write(chunk(index, piece))
            if scanner is not None and scanner.done:
                stopped.add(index)
                await response.write(chunk(index, {}, _finish_reason(seqs[index], scanner, choice)))
                service.stop(seqs[index])
            continue
        finished = seqs[index].finished
        if finished.reason not in FINISH_REASONS:
            await response.write(sse.frame(openai_body(failure(finished))))
            return response, None
        events = scanner.flush() if scanner else []
        answer += events if index == 0 else []
        for piece in _deltas(events, scanner):
            await response.write(chunk(index, piece))
        await response.write(chunk(index, {}, _finish_reason(seqs[index], scanner, choice)))
    if include_usage:
        await response.write(sse.frame({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(seqs)}))
    await response.write(sse.DONE)
    await response.write_eof()
    return response, answer


def model_object(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 1735689600, "owned_by": "semcache"}
