"""Anthropic Messages requests: the body's types and its conversion to dialect-neutral turns and tools."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from semcache.text.chat import ChatMessage
from semcache.ops.errors import invalid, unsupported
from semcache.text.toolrequest import check_answers, check_depth, check_unique, make_choice, make_tool
from semcache.text.tools import Tool, ToolCall, ToolChoice


class TextBlock(Struct, tag="text"):
    text: str
    cache_control: Union[dict, None] = None


class ImageBlock(Struct, tag="image"):
    pass


class DocumentBlock(Struct, tag="document"):
    pass


class ToolUseBlock(Struct, tag="tool_use"):
    id: str
    name: str
    input: dict
    cache_control: Union[dict, None] = None


class ToolResultBlock(Struct, tag="tool_result"):
    tool_use_id: str
    content: Union[str, list[Union[TextBlock, ImageBlock, DocumentBlock]], None] = None
    is_error: bool = False
    cache_control: Union[dict, None] = None


class ThinkingBlock(Struct, tag="thinking"):
    pass


class RedactedThinkingBlock(Struct, tag="redacted_thinking"):
    pass


Block = Union[
    TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock
]
_UNSUPPORTED_BLOCKS = (ImageBlock, DocumentBlock)
_TOOL_BLOCKS = (ToolUseBlock, ToolResultBlock)
_SKIPPED_BLOCKS = (ThinkingBlock, RedactedThinkingBlock)  # earlier turns' thinking: not prompt text


class Message(Struct):
    role: Literal["user", "assistant", "system"]
    content: Union[str, list[Block]]


class _Prompt(Struct, kw_only=True):
    model: str
    messages: Annotated[list[Message], Meta(min_length=1)]
    system: Union[str, list[TextBlock], None] = None
    tools: Union[list[dict], None] = None  # checked by parse_tools: server tools get their own 400
    tool_choice: Union[dict, None] = None


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


messages_decoder = msgspec.json.Decoder(MessagesRequest)
count_decoder = msgspec.json.Decoder(CountTokensRequest)


def _block_text(content: Union[str, list], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if isinstance(block, _UNSUPPORTED_BLOCKS):
            kind = type(block).__struct_config__.tag
            raise unsupported(f"content blocks of type '{kind}' are", param=f"{where}[{i}].type")
        if not isinstance(block, (*_SKIPPED_BLOCKS, *_TOOL_BLOCKS)):
            parts.append(block.text)
    return "\n".join(parts)


# Claude Code's first system block: its version and entry point, and per-session (or older releases:
# per-request) fields. The model never needs it, and rendering it would give every session its own
# prefix, so it is left out of the prompt, and out of usage, as Anthropic's API does.
BILLING_PREFIX = "x-anthropic-billing-header:"


def _system_blocks(body: _Prompt) -> list[TextBlock]:
    """The top-level system blocks that reach the prompt (leading billing blocks left out)."""
    if not isinstance(body.system, list):
        return []
    blocks = body.system
    while blocks and blocks[0].text.startswith(BILLING_PREFIX):
        blocks = blocks[1:]
    return blocks


def _system_text(body: _Prompt) -> str:
    if isinstance(body.system, str):
        return "" if body.system.startswith(BILLING_PREFIX) else body.system
    return _block_text(_system_blocks(body), "system")


def breakpoint_messages(body: _Prompt) -> list[ChatMessage] | None:
    """The conversation cut after the last block marked with cache_control (None: no mark). A mark
    on a tool covers the system prompt, which the tool list is rendered into."""
    system = _system_blocks(body)
    cut = None
    if any(isinstance(t, dict) and t.get("cache_control") is not None for t in body.tools or ()):
        cut = (-1, len(system) - 1)
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
        text = _system_text(body) if j == len(system) - 1 else _block_text(system[: j + 1], "system")
        return [ChatMessage("system", text)] if text else []
    message = body.messages[i]
    head = msgspec.structs.replace(body, messages=[*body.messages[:i], Message(message.role, message.content[: j + 1])])
    return chat_messages(head, check_final=False)


def parse_tools(body: _Prompt) -> tuple[list[Tool], ToolChoice]:
    """Declared custom tools and tool_choice; server tools (versioned types) are a 400."""
    tools = []
    for i, raw in enumerate(body.tools or ()):
        where = f"tools[{i}]"
        if not isinstance(raw, dict):
            raise invalid(f"{where} must be an object", param=where)
        kind = raw.get("type")
        if kind not in (None, "custom"):
            # Anthropic's wording for a tool type it does not know: Claude Code reads the type from
            # it, drops that tool and retries.
            raise invalid(f"tools.{i}: Input tag '{kind}' found using 'type' does not match any of the "
                          "expected tags: 'custom'", param=f"{where}.type")
        if "input_schema" not in raw:
            raise invalid(f"{where}.input_schema: a custom tool needs an input_schema", param=f"{where}.input_schema")
        tools.append(make_tool(raw.get("name"), raw.get("description"), raw["input_schema"], where, "input_schema"))
    check_unique(tools, "tools")
    choice = body.tool_choice
    if choice is None:
        return tools, ToolChoice()
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise invalid(f"tool_choice.type must be one of auto, any, tool, none; got {kind!r}", param="tool_choice.type")
    parallel = choice.get("disable_parallel_tool_use", False)
    if not isinstance(parallel, bool):
        raise invalid("tool_choice.disable_parallel_tool_use must be a boolean",
                      param="tool_choice.disable_parallel_tool_use")
    mode = "required" if kind == "any" else kind
    return tools, make_choice(tools, mode, choice.get("name"), not parallel, "tool_choice")


def chat_messages(body: _Prompt, check_final: bool = True) -> list[ChatMessage]:
    """The conversation as template-ready messages; unsupported features are a 400 naming the field."""
    out = []
    system = _system_text(body)
    if system:
        out.append(ChatMessage("system", system))
    # A system message later in the conversation (Claude Code sends them) stays where it is: hoisting
    # it into the top-level system would change the prefix every later turn reuses.
    for i, message in enumerate(body.messages):
        out.extend(_turns(message, f"messages[{i}]", out, bool(body.tools)))
    if check_final and out and out[-1].role == "assistant" and out[-1].content != out[-1].content.rstrip():
        raise invalid("final assistant content cannot end with trailing whitespace",
                      param=f"messages[{len(body.messages) - 1}].content")
    return out


def _turns(message: Message, where: str, previous: list[ChatMessage], has_tools: bool) -> list[ChatMessage]:
    """One API message as turns: its tool results (each a "tool" turn), then its text and calls."""
    content = message.content
    if isinstance(content, str) or not any(isinstance(b, _TOOL_BLOCKS) for b in content):
        return [ChatMessage(message.role, _block_text(content, f"{where}.content"))]
    if not has_tools:
        raise invalid(f"{where}.content: requests with tool_use or tool_result blocks must declare tools",
                      param="tools")
    results: list[ChatMessage] = []
    texts, calls = [], []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        if isinstance(block, ToolUseBlock):
            if message.role != "assistant":
                raise invalid(f"{at}: tool_use blocks belong in assistant turns", param=at)
            calls.append(ToolCall(block.id, block.name, check_depth(block.input, f"{at}.input")))
        elif isinstance(block, ToolResultBlock):
            if message.role != "user":
                raise invalid(f"{at}: tool_result blocks belong in user turns", param=at)
            check_answers(previous, block.tool_use_id, f"{at}.tool_use_id")
            text = _block_text(block.content or "", f"{at}.content")
            results.append(ChatMessage("tool", "Error: " + text if block.is_error else text,
                                       tool_call_id=block.tool_use_id))
        else:
            texts.append(_block_text(content[j: j + 1], f"{where}.content"))
    turn = [ChatMessage(message.role, "\n".join(t for t in texts if t), tuple(calls))] if texts or calls else []
    return results + turn
