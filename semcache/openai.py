"""OpenAI Chat Completions: /v1/chat/completions (+stream with include_usage)."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import replace
from typing import Annotated, Literal, Union

import msgspec
from aiohttp import web
from msgspec import Meta, Struct

from semcache import sse
from semcache.chat import ChatMessage
from semcache.errors import invalid, openai_body, unsupported
from semcache.identity import identity, note_usage, priority, rate_key
from semcache.keys import SERVICE
from semcache.sequence import FinishReason, SamplingParams, Sequence
from semcache.serving import Generation, decode_body, failure

FINISH_REASONS = {
    FinishReason.END: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.LENGTH: "length",
}
MAX_CHOICES = 16
_ROLES = {"developer": "system", "system": "system", "user": "user", "assistant": "assistant"}


class TextPart(Struct, tag="text"):
    text: str


class RefusalPart(Struct, tag="refusal"):
    refusal: str


class ImagePart(Struct, tag="image_url"):
    pass


class AudioPart(Struct, tag="input_audio"):
    pass


class FilePart(Struct, tag="file"):
    pass


Part = Union[TextPart, RefusalPart, ImagePart, AudioPart, FilePart]


class Message(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[Part], None] = None
    tool_calls: Union[list[dict], None] = None


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class ResponseFormat(Struct, kw_only=True):
    type: str


PositiveInt = Annotated[int, Meta(ge=1)]


class ChatRequest(Struct, kw_only=True):
    model: str
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_tokens: Union[PositiveInt, None] = None
    max_completion_tokens: Union[PositiveInt, None] = None
    temperature: Union[Annotated[float, Meta(ge=0.0, le=2.0)], None] = None
    top_p: Union[Annotated[float, Meta(ge=0.0, le=1.0)], None] = None
    top_k: Union[Annotated[int, Meta(ge=-1)], None] = None
    stop: Union[str, Annotated[list[str], Meta(max_length=4)], None] = None
    stream: bool = False
    stream_options: Union[StreamOptions, None] = None
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] = 1
    seed: Union[int, None] = None
    tools: Union[list[dict], None] = None
    response_format: Union[ResponseFormat, None] = None
    logprobs: Union[bool, None] = None
    priority: Union[int, None] = None
    continue_final_message: bool = False  # vLLM's extension: continue a trailing assistant message


_decoder = msgspec.json.Decoder(ChatRequest)


def _content_text(content: Union[str, list, None], where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for i, part in enumerate(content):
        if isinstance(part, (ImagePart, AudioPart, FilePart)):
            kind = type(part).__struct_config__.tag
            raise unsupported(f"content parts of type '{kind}' are", param=f"{where}[{i}].type")
        parts.append(part.text if isinstance(part, TextPart) else part.refusal)
    return "\n".join(parts)


def chat_messages(body: ChatRequest) -> list[ChatMessage]:
    """Template-ready messages; tools, tool turns and multimodal parts are a 400 for now."""
    if body.tools:
        raise unsupported("tools are", param="tools")
    out = []
    for i, message in enumerate(body.messages):
        if message.role not in _ROLES or message.tool_calls:
            raise unsupported(f"'{message.role}' messages and tool calls are", param=f"messages[{i}]")
        out.append(ChatMessage(_ROLES[message.role], _content_text(message.content, f"messages[{i}].content")))
    return out


def _check(body: ChatRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options can only be set when stream is true", param="stream_options")
    if body.logprobs:
        raise unsupported("logprobs are", param="logprobs")
    if body.response_format is not None and body.response_format.type != "text":
        raise unsupported(f"response_format '{body.response_format.type}' is", param="response_format")


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
    body = decode_body(await request.read(), _decoder)
    _check(body)
    max_tokens = body.max_completion_tokens or body.max_tokens or service.config.default_max_tokens
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    sampling = SamplingParams.from_request(body.temperature, body.top_p, body.top_k, body.seed)
    tenant, agent = identity(request)
    gen = Generation(
        messages=chat_messages(body),
        max_tokens=max_tokens,
        sampling=sampling,
        stop=stop,
        priority=priority(request, body.priority),
        continue_final=body.continue_final_message,
        tenant=tenant,
        agent=agent,
        rate_key=rate_key(request),
    )
    if body.n > service.config.max_active:
        raise invalid(f"n ({body.n}) is larger than max_active ({service.config.max_active})", param="n")
    seqs = await _start_choices(service, gen, body.n)
    try:
        head = {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "created": int(time.time()),
            "model": body.model,
            "system_fingerprint": "fp_" + service.engine.info.fingerprint[:10],
        }
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(request, seqs, head, include_usage)
        texts = await asyncio.gather(*(seq.text() for seq in seqs))
        for seq in seqs:
            if seq.finished.reason not in FINISH_REASONS:
                raise failure(seq.finished)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": FINISH_REASONS[seq.finished.reason],
            }
            for i, (seq, text) in enumerate(zip(seqs, texts))
        ]
        return web.json_response({**head, "object": "chat.completion", "choices": choices, "usage": usage(seqs)})
    finally:
        note_usage(request, seqs)
        for seq in seqs:
            service.release(seq)


async def _start_choices(service, gen: Generation, n: int) -> list[Sequence]:
    """n sequences for n choices (seeded ones get seed, seed+1, ...); all queued or none."""
    gens = [gen]
    for i in range(1, n):
        seed = None if gen.sampling.seed is None else gen.sampling.seed + i
        gens.append(replace(gen, sampling=replace(gen.sampling, seed=seed)))
    tasks = [asyncio.create_task(service.start(g)) for g in gens]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in tasks if t.done() and t.exception() is not None), None)
        if failed is not None:
            raise failed.exception()
    except BaseException:  # a refusal, or the client went away: stop every choice, queued or running
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                service.release(task.result())
        raise
    return [task.result() for task in tasks]


async def _merged(seqs: list[Sequence]):
    """(choice index, text delta) as any choice produces one; (index, None) when that choice ends."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, seq: Sequence) -> None:
        async for delta in seq.stream():
            queue.put_nowait((index, delta))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, seq)) for i, seq in enumerate(seqs)]
    try:
        for _ in range(len(seqs)):
            while True:
                index, delta = await queue.get()
                yield index, delta
                if delta is None:
                    break
    finally:
        for task in tasks:
            task.cancel()


async def _stream(request: web.Request, seqs: list[Sequence], head: dict, include_usage: bool):
    response = await sse.open_stream(request)
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse.frame({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    for index in range(len(seqs)):
        await response.write(chunk(index, {"role": "assistant", "content": ""}))
    async for index, delta in _merged(seqs):
        if delta is not None:
            await response.write(chunk(index, {"content": delta}))
            continue
        finished = seqs[index].finished
        if finished.reason not in FINISH_REASONS:
            await response.write(sse.frame(openai_body(failure(finished))))
            return response
        await response.write(chunk(index, {}, FINISH_REASONS[finished.reason]))
    if include_usage:
        await response.write(sse.frame({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(seqs)}))
    await response.write(sse.DONE)
    await response.write_eof()
    return response


def model_object(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 1735689600, "owned_by": "semcache"}
