"""OpenAI Chat Completions: /v1/chat/completions (+stream with include_usage)."""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Literal, Union

import msgspec
from aiohttp import web
from msgspec import Meta, Struct

from semcache import sse
from semcache.chat import ChatMessage
from semcache.errors import invalid, openai_body, unsupported
from semcache.keys import SERVICE
from semcache.sequence import FinishReason, SamplingParams, Sequence
from semcache.serving import Generation, decode_body, failure, parse_priority

FINISH_REASONS = {
    FinishReason.END: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.LENGTH: "length",
}
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
    n: PositiveInt = 1
    seed: Union[int, None] = None
    tools: Union[list[dict], None] = None
    response_format: Union[ResponseFormat, None] = None
    logprobs: Union[bool, None] = None
    priority: Union[int, None] = None


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
    if body.n != 1:
        raise unsupported("n other than 1 is", param="n")
    if body.logprobs:
        raise unsupported("logprobs are", param="logprobs")
    if body.response_format is not None and body.response_format.type != "text":
        raise unsupported(f"response_format '{body.response_format.type}' is", param="response_format")


def usage(seq: Sequence) -> dict:
    return {
        "prompt_tokens": seq.num_prompt_tokens,
        "completion_tokens": seq.num_output_tokens,
        "total_tokens": seq.num_prompt_tokens + seq.num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    body = decode_body(await request.read(), _decoder)
    _check(body)
    max_tokens = body.max_completion_tokens or body.max_tokens or service.config.default_max_tokens
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    sampling = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
    )
    gen = Generation(
        messages=chat_messages(body),
        max_tokens=max_tokens,
        sampling=sampling,
        stop=stop,
        priority=parse_priority(request.headers.get("X-Priority"), body.priority),
    )
    seq = await service.start(gen)
    try:
        head = {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "created": int(time.time()),
            "model": body.model,
            "system_fingerprint": "fp_" + service.engine.info.fingerprint[:10],
        }
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(request, seq, head, include_usage)
        text = await seq.text()
        if seq.finished.reason not in FINISH_REASONS:
            raise failure(seq.finished)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": FINISH_REASONS[seq.finished.reason],
        }
        return web.json_response({**head, "object": "chat.completion", "choices": [choice], "usage": usage(seq)})
    finally:
        service.scheduler.abort(seq)


async def _stream(request: web.Request, seq: Sequence, head: dict, include_usage: bool):
    response = await sse.open_stream(request)
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse.frame({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    await response.write(chunk({"role": "assistant", "content": ""}))
    async for delta in seq.stream():
        await response.write(chunk({"content": delta}))
    if seq.finished.reason not in FINISH_REASONS:
        await response.write(sse.frame(openai_body(failure(seq.finished))))
        return response
    await response.write(chunk({}, FINISH_REASONS[seq.finished.reason]))
    if include_usage:
        await response.write(sse.frame({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(seq)}))
    await response.write(sse.DONE)
    await response.write_eof()
    return response


def model_object(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 1735689600, "owned_by": "semcache"}
