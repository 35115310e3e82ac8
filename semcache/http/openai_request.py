"""OpenAI Chat Completions requests: the body's types and its conversion to turns, tools and JSON mode."""

from __future__ import annotations

import json
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from semcache.text.chat import ChatMessage
from semcache.ops.errors import invalid, unsupported
from semcache.text.toolrequest import check_answers, check_depth, check_unique, make_choice, make_tool
from semcache.text.tools import Tool, ToolCall, ToolChoice

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


class Function(Struct, kw_only=True):
    name: str
    arguments: str


class ToolCallParam(Struct, kw_only=True):
    id: str
    function: Function
    type: Literal["function"] = "function"


class Message(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[Part], None] = None
    tool_calls: Union[list[ToolCallParam], None] = None
    tool_call_id: Union[str, None] = None


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class JsonSchemaFormat(Struct, kw_only=True):
    name: str = "response"
    schema: Union[dict, None] = None
    strict: Union[bool, None] = None


class ResponseFormat(Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Union[JsonSchemaFormat, None] = None


PositiveInt = Annotated[int, Meta(ge=1)]


class ChatRequest(Struct, kw_only=True):
    model: str
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_tokens: Union[PositiveInt, None] = None
    max_completion_tokens: Union[PositiveInt, None] = None
    temperature: Union[Annotated[float, Meta(ge=0.0, le=2.0)], None] = None
    top_p: Union[Annotated[float, Meta(ge=0.0, le=1.0)], None] = None
    top_k: Union[Annotated[int, Meta(ge=-1)], None] = None
    stop: Union[str, list[str], None] = None  # capped by body.stop_strings
    stream: bool = False
    stream_options: Union[StreamOptions, None] = None
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] = 1
    seed: Union[int, None] = None
    tools: Union[list[dict], None] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    parallel_tool_calls: bool = True
    response_format: Union[ResponseFormat, None] = None
    logprobs: Union[bool, None] = None
    priority: Union[int, None] = None
    continue_final_message: bool = False  # vLLM's extension: continue a trailing assistant message


chat_decoder = msgspec.json.Decoder(ChatRequest)


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


def parse_tools(body: ChatRequest) -> tuple[list[Tool], ToolChoice]:
    tools = []
    for i, raw in enumerate(body.tools or ()):
        where = f"tools[{i}]"
        if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(raw.get("function"), dict):
            raise unsupported(f"{where}: only {{\"type\": \"function\", \"function\": {{...}}}} tools are",
                              param=f"{where}.type")
        fn = raw["function"]
        tools.append(make_tool(fn.get("name"), fn.get("description"), fn.get("parameters"), f"{where}.function",
                               "parameters"))
    check_unique(tools, "tools")
    choice = body.tool_choice
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or "name" not in fn:
            raise invalid('tool_choice must be "none", "auto", "required" or '
                          '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        return tools, make_choice(tools, "tool", fn["name"], body.parallel_tool_calls, "tool_choice.function")
    return tools, make_choice(tools, choice or "auto", None, body.parallel_tool_calls, "tool_choice")


def chat_messages(body: ChatRequest) -> list[ChatMessage]:
    """Template-ready messages: assistant tool calls and tool results included; a 400 names the field."""
    out: list[ChatMessage] = []
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        text = _content_text(message.content, f"{where}.content")
        if message.role == "tool":
            if message.tool_call_id is None:
                raise invalid(f"{where}.tool_call_id: tool messages need the id of the call they answer",
                              param=f"{where}.tool_call_id")
            check_answers(out, message.tool_call_id, f"{where}.tool_call_id")
            out.append(ChatMessage("tool", text, tool_call_id=message.tool_call_id))
        elif message.role not in _ROLES:
            raise unsupported(f"'{message.role}' messages (use tool messages) are", param=f"{where}.role")
        elif message.tool_calls:
            if message.role != "assistant":
                raise invalid(f"{where}.tool_calls: only assistant messages carry tool calls", param=f"{where}.tool_calls")
            calls = tuple(_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(message.tool_calls))
            out.append(ChatMessage("assistant", text, calls))
        else:
            out.append(ChatMessage(_ROLES[message.role], text))
    return out


def _call(param: ToolCallParam, where: str) -> ToolCall:
    text = check_depth(param.function.arguments or "{}", f"{where}.function.arguments")
    try:
        arguments = json.loads(text)
    except (ValueError, RecursionError):
        arguments = None
    if not isinstance(arguments, dict):
        raise invalid(f"{where}.function.arguments must be a JSON object encoded as a string",
                      param=f"{where}.function.arguments")
    return ToolCall(param.id, param.function.name, arguments)


def check(body: ChatRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options can only be set when stream is true", param="stream_options")
    if body.logprobs:
        raise unsupported("logprobs are", param="logprobs")
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema is None):
        raise invalid("response_format.json_schema.schema is required for type json_schema",
                      param="response_format.json_schema")
    if fmt is not None and fmt.json_schema is not None and fmt.json_schema.schema is not None:
        check_depth(fmt.json_schema.schema, "response_format.json_schema.schema")


def response_json(body: ChatRequest) -> tuple[bool, dict | None]:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return False, None
    return True, fmt.json_schema.schema if fmt.type == "json_schema" else None
