"""Which tool-call format a model speaks: its own, when mlx-lm knows the family's parser and the
chat template takes tools, else semcache's fallback format (text/tools.py)."""

from __future__ import annotations

import importlib
from typing import Any

from semcache.text.tools import FALLBACK, ToolFormat

__all__ = ["format_for"]


def format_for(tokenizer: Any) -> ToolFormat:
    """The model's own format when mlx-lm knows its family and its template takes tools, else FALLBACK."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str) or "tools" not in template:
        return FALLBACK
    try:
        from mlx_lm.tokenizer_utils import _infer_tool_parser

        name = _infer_tool_parser(tokenizer)
        module = importlib.import_module(f"mlx_lm.tool_parsers.{name}") if name else None
    except Exception:
        module = None
    if module is None:
        return FALLBACK
    return ToolFormat(module.tool_call_start, module.tool_call_end, native=True,
                      json_body=name == "json_tools", _parse=module.parse_tool_call)
