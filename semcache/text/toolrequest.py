"""Tool declarations and tool turns in a request, checked as both APIs check them: every error
is a 400 naming its field (`where` is the field's path in the caller's dialect)."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import numpy as np

from semcache.ops.errors import invalid
from semcache.text.tools import Tool, ToolChoice

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# JSON nesting allowed in tool schemas, response formats and tool-call arguments: far beyond real
# ones, and below what recurses on them (json.dumps, chat templates, llguidance's parser stops at 128).
MAX_DEPTH = 100
_STEPS = np.zeros(256, dtype=np.int32)
_STEPS[list(b"[{")], _STEPS[list(b"]}")] = 1, -1
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))


def make_tool(name: Any, description: Any, schema: Any, where: str, schema_field: str) -> Tool:
    """A declared tool, checked as both APIs check it; errors name the field (`where` is its path)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise invalid(f"{where}.name: tool names are 1-64 characters of letters, digits, '_' and '-'; "
                      f"got {name!r}", param=f"{where}.name")
    if description is not None and not isinstance(description, str):
        raise invalid(f"{where}.description must be a string", param=f"{where}.description")
    if schema is None:
        schema = {"type": "object", "properties": {}}
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise invalid(f"{where}.{schema_field} must be a JSON schema object with \"type\": \"object\"",
                      param=f"{where}.{schema_field}")
    return Tool(name, description or "", check_depth(schema, f"{where}.{schema_field}"))


def check_depth(value: Any, where: str) -> Any:
    """`value` (decoded JSON, or JSON text), or a 400 naming `where` when it nests deeper than
    MAX_DEPTH. Counted on its JSON text at C speed: a body can hold millions of containers."""
    try:
        text = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else msgspec.json.encode(value)
    except RecursionError:  # too deep even to encode
        text = b"[" * (MAX_DEPTH + 1)
    if _too_deep(text):
        raise invalid(f"{where} is nested more than {MAX_DEPTH} levels deep", param=where)
    return value


def _too_deep(text: bytes) -> bool:
    """Whether brackets outside strings nest deeper than MAX_DEPTH in JSON `text`, with bytes and
    numpy passes: escaped backslashes and quotes go first, so every quote left opens or closes a string."""
    text = text.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    if len(text) <= MAX_DEPTH:  # too few brackets to nest that deep (and numpy's overhead is the cost)
        return False
    codes = np.frombuffer(text, dtype=np.uint8)
    steps = np.where(np.cumsum(codes == ord('"'), dtype=np.int32) & 1, 0, _STEPS[codes])
    return int(np.cumsum(steps, dtype=np.int32).max()) > MAX_DEPTH


def check_unique(tools: list[Tool], where: str) -> list[Tool]:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise invalid(f"{where}[{i}].name: tool names must be unique; '{tool.name}' appears twice",
                          param=f"{where}[{i}].name")
        seen.add(tool.name)
    return tools


def make_choice(tools: list[Tool], mode: str, name: Any, parallel: bool, where: str) -> ToolChoice:
    """A tool_choice that can be honoured with these tools (forcing a call needs a tool to call)."""
    if mode in ("required", "tool") and not tools:
        raise invalid(f"{where}: a tool call cannot be forced without tools", param=where)
    if mode == "tool" and name not in {t.name for t in tools}:
        raise invalid(f"{where}.name: '{name}' is not one of the declared tools", param=f"{where}.name")
    return ToolChoice(mode, name if mode == "tool" else None, parallel)  # type: ignore[arg-type]


def check_answers(previous: list, call_id: str, where: str) -> None:
    """A tool result must answer a call of the latest assistant turn among the `previous` turns."""
    for m in reversed(previous):
        if m.role == "assistant":
            if any(c.id == call_id for c in m.tool_calls):
                return
            break
    raise invalid(f"{where}: '{call_id}' does not answer a tool call of the preceding assistant turn",
                  param=where)
