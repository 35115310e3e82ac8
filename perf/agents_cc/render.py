"""A recorded Anthropic request body as the daemon's prompt token ids (embedded model, in process)."""

from __future__ import annotations

from functools import cache

import msgspec


@cache
def _renderer():
    from semcache.engine.models import embedded_model_path, load_gguf_tokenizer
    from semcache.text.chat import PromptRenderer

    return PromptRenderer(load_gguf_tokenizer(embedded_model_path()))


def render_ids(body: dict) -> list[int]:
    from semcache.http.anthropic_request import MessagesRequest, chat_messages, parse_tools

    request = msgspec.convert(body, MessagesRequest)
    tools, _ = parse_tools(request)
    return _renderer().render(chat_messages(request), continue_final=True, tools=tools)


def count_tokens(text: str) -> int:
    return len(_renderer().tokenizer.encode(text, add_special_tokens=False))
