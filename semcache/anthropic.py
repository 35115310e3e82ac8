"""Anthropic Messages API: /v1/messages (+SSE stream) and /v1/messages/count_tokens."""

from __future__ import annotations

import secrets
from typing import Annotated, Literal, Union

import msgspec
from aiohttp import web
from msgspec import Meta, Struct

from semcache import sse
from semcache.chat import ChatMessage
from semcache.errors import anthropic_body, invalid, unsupported
from semcache.identity import identity, note_usage, priority, rate_key
from semcache.keys import SERVICE
from semcache.sequence import FinishReason, SamplingParams, Sequence
from semcache.serving import Generation, decode_body, failure

STOP_REASONS = {
    FinishReason.END: "end_turn",
    FinishReason.LENGTH: "max_tokens",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
}


class TextBlock(Struct, tag="text"):
    text: str
    cache_control: Union[dict, None] = None


class ImageBlock(Struct, tag="image"):
    pass


class DocumentBlock(Struct, tag="document"):
    pass


class ToolUseBlock(Struct, tag="tool_use"):
    pass


class ToolResultBlock(Struct, tag="tool_result"):
    pass


class ThinkingBlock(Struct, tag="thinking"):
    pass


class RedactedThinkingBlock(Struct, tag="redacted_thinking"):
    pass


Block = Union[
    TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock
]
_UNSUPPORTED_BLOCKS = (ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock)
_SKIPPED_BLOCKS = (ThinkingBlock, RedactedThinkingBlock)  # earlier turns' thinking: not prompt text


class Message(Struct):
    role: Literal["user", "assistant", "system"]
    content: Union[str, list[Block]]


class _Prompt(Struct, kw_only=True):
    model: str
    messages: Annotated[list[Message], Meta(min_length=1)]
    system: Union[str, list[TextBlock], None] = None
    tools: Union[list[dict], None] = None


class CountTokensRequest(_Prompt, kw_only=True):
    pass


class MessagesRequest(_Prompt, kw_only=True):
    max_tokens: Annotated[int, Meta(ge=0)]
    stop_sequences: Union[list[str], None] = None
    stream: bool = False
    temperature: Union[Annotated[float, Meta(ge=0.0, le=1.0)], None] = None
    top_p: Union[Annotated[float, Meta(ge=0.0, le=1.0)], None] = None
    top_k: Union[Annotated[int, Meta(ge=0)], None] = None
    priority: Union[int, None] = None


_messages_decoder = msgspec.json.Decoder(MessagesRequest)
_count_decoder = msgspec.json.Decoder(CountTokensRequest)


def _block_text(content: Union[str, list], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if isinstance(block, _UNSUPPORTED_BLOCKS):
            kind = type(block).__struct_config__.tag
            raise unsupported(f"content blocks of type '{kind}' are", param=f"{where}[{i}].type")
        if not isinstance(block, _SKIPPED_BLOCKS):
            parts.append(block.text)
    return "\n".join(parts)


def breakpoint_messages(body: _Prompt) -> list[ChatMessage] | None:
    """The conversation cut after the last block marked with cache_control (None: no mark)."""
    system = body.system if isinstance(body.system, list) else []
    cut = None
    for j, block in enumerate(system):
        if block.cache_control is not None:
            cut = (-1, j)
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for j, block in enumerate(message.content):
                if getattr(block, "cache_control", None) is not None:
                    cut = (i, j)
    if cut is None:
        return None
    i, j = cut
    if i < 0:
        return [ChatMessage("system", _block_text(system[: j + 1], "system"))]
    head = chat_messages(body)[: i + (1 if body.system else 0)]
    message = body.messages[i]
    return head + [ChatMessage(message.role, _block_text(message.content[: j + 1], f"messages[{i}].content"))]


def chat_messages(body: _Prompt) -> list[ChatMessage]:
    """The conversation as template-ready messages; unsupported features are a 400 naming the field."""
    if body.tools:
        raise unsupported("tools are", param="tools")
    out = []
    if body.system:
        out.append(ChatMessage("system", _block_text(body.system, "system")))
    for i, message in enumerate(body.messages):
        if message.role == "system" and any(m.role != "system" for m in body.messages[:i]):
            raise invalid("system messages may only come first; use the top-level system field",
                          param=f"messages[{i}].role")
        out.append(ChatMessage(message.role, _block_text(message.content, f"messages[{i}].content")))
    if out[-1].role == "assistant" and out[-1].content != out[-1].content.rstrip():
        raise invalid("final assistant content cannot end with trailing whitespace",
                      param=f"messages[{len(body.messages) - 1}].content")
    return out


def usage(seq: Sequence) -> dict:
    """As the real API defines them, the three input counters add up to the prompt's tokens: read
    from the cache, written to it (not reused, up to the last cache_control mark), and the rest."""
    read = seq.num_cached_tokens
    creation = max(0, min(seq.cache_breakpoint, seq.num_prompt_tokens) - read)
    return {
        "input_tokens": seq.num_prompt_tokens - read - creation,
        "output_tokens": seq.num_output_tokens,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
    }


def _message(body: MessagesRequest, msg_id: str, content: list, seq: Sequence, final: bool = True) -> dict:
    """The Message object; message_start sends it with final=False (no stop reason yet)."""
    finished = seq.finished if final else None
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": body.model,
        "content": content,
        "stop_reason": STOP_REASONS.get(finished.reason) if finished else None,
        "stop_sequence": finished.stop_sequence if finished else None,
        "usage": usage(seq),
    }


async def messages(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    body = decode_body(await request.read(), _messages_decoder)
    sampling = SamplingParams.from_request(body.temperature, body.top_p, body.top_k)
    tenant, agent = identity(request)
    gen = Generation(
        messages=chat_messages(body),
        max_tokens=body.max_tokens,
        sampling=sampling,
        stop=tuple(body.stop_sequences or ()),
        priority=priority(request, body.priority),
        continue_final=True,  # Anthropic "prefill": the answer continues a final assistant turn
        tenant=tenant,
        agent=agent,
        breakpoint=breakpoint_messages(body),
        rate_key=rate_key(request),
    )
    seq = await service.start(gen)
    try:
        msg_id = "msg_" + secrets.token_hex(12)
        if body.stream:
            return await _stream(request, body, seq, msg_id)
        text = await seq.text()
        if seq.finished.reason not in STOP_REASONS:
            raise failure(seq.finished)
        return web.json_response(_message(body, msg_id, [{"type": "text", "text": text}], seq))
    finally:
        note_usage(request, [seq])
        service.release(seq)


async def _stream(request: web.Request, body: MessagesRequest, seq: Sequence, msg_id: str):
    response = await sse.open_stream(request)
    write = response.write
    start = _message(body, msg_id, [], seq, final=False)
    await write(sse.frame({"type": "message_start", "message": start}, "message_start"))
    await write(sse.frame(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        "content_block_start",
    ))
    await write(sse.frame({"type": "ping"}, "ping"))
    async for delta in seq.stream():
        await write(sse.frame(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": delta}},
            "content_block_delta",
        ))
    finished = seq.finished
    if finished.reason not in STOP_REASONS:
        await write(sse.frame(anthropic_body(failure(finished)), "error"))
        return response
    await write(sse.frame({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    await write(sse.frame(
        {
            "type": "message_delta",
            "delta": {"stop_reason": STOP_REASONS[finished.reason], "stop_sequence": finished.stop_sequence},
            "usage": usage(seq),
        },
        "message_delta",
    ))
    await write(sse.frame({"type": "message_stop"}, "message_stop"))
    await response.write_eof()
    return response


async def count_tokens(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = decode_body(await request.read(), _count_decoder)
    prompt_ids = await service.tokenize(chat_messages(body), continue_final=True)
    return web.json_response({"input_tokens": len(prompt_ids)})


def model_info(model_id: str, context_length: int) -> dict:
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id,
        "created_at": "2025-01-01T00:00:00Z",
        "lifecycle": "active",
        "max_input_tokens": context_length,
    }
