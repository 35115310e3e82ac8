"""Tool declarations and tool turns in a request, checked as both APIs check them: every error
is a 400 naming its field (`where` is the field's path in the caller's dialect)."""

from __future__ import annotations

import re
from typing import Any

from semcache.ops.errors import invalid
from semcache.text.tools import Tool, ToolChoice

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


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
    return Tool(name, description or "", schema)


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
