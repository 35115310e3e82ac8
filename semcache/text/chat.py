"""Text side of generation: chat messages → token ids, incremental detokenizing, stop sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from semcache.text.holdback import Markers
from semcache.text.tokenfloor import Floor
from semcache.text.tools import (
    FALLBACK,
    Call,
    Text,
    Tool,
    ToolCall,
    ToolFormat,
    call_text,
    fallback_system,
    join_text,
    result_text,
)


@dataclass(frozen=True)
class ChatMessage:
    """One turn. An assistant turn may end with tool calls; a "tool" turn is one call's result."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


class PromptTooLong(ValueError):
    """The prompt has at least `tokens` tokens, `limit` or more: it is not worth tokenizing."""

    def __init__(self, tokens: int, limit: int):
        super().__init__(f"the prompt has at least {tokens} tokens (limit {limit})")
        self.tokens, self.limit = tokens, limit


class PromptRenderer:
    """Renders a chat with the model's own template, then tokenizes without adding specials again."""

    def __init__(self, tokenizer: Any, tool_format: ToolFormat = FALLBACK):
        self.tokenizer = tokenizer
        self.tool_format = tool_format
        self._floor: Floor | None = None

    def render(self, messages: list[ChatMessage], continue_final: bool = False, generate: bool = True,
               tools: list[Tool] | None = None, limit: int | None = None) -> list[int]:
        """Token ids for `messages`. Consecutive turns of one role are joined (strict templates reject
        them); with `continue_final`, a trailing assistant message is continued, not closed; without
        `generate`, no assistant turn is opened (the warm-up prompt of /v1/agents/{id}/warm). With
        `limit`, PromptTooLong when the text's length alone shows it has `limit` tokens or more."""
        text = self.text(messages, continue_final, generate, tools)
        if limit is not None:
            if self._floor is None:  # built once per model, on the first prompt (a vocabulary scan)
                self._floor = Floor(getattr(self.tokenizer, "backend_tokenizer", None))
            floor = self._floor.tokens(text, limit)
            if floor >= limit:
                raise PromptTooLong(floor, limit)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def text(self, messages: list[ChatMessage], continue_final: bool = False, generate: bool = True,
             tools: list[Tool] | None = None) -> str:
        native = self.tool_format.native
        messages = merge_turns(messages if native else fallback_turns(messages, tools))
        prefill = ""
        if continue_final and messages and messages[-1].role == "assistant" and not messages[-1].tool_calls:
            prefill = messages[-1].content
            messages = messages[:-1]
        extra = {"tools": [t.openai() for t in tools]} if tools and native else {}
        try:
            return self._apply(messages, generate, extra) + prefill
        except Exception:
            # A template that rejects a system message after the first turn (many raise on it):
            # the documented fallback renders each such message as a <system-reminder> user turn.
            fallback = merge_turns(reminders_as_user_turns(messages))
            if fallback == messages:
                raise
            return self._apply(fallback, generate, extra) + prefill

    def _apply(self, messages: list[ChatMessage], generate: bool, extra: dict) -> str:
        dicts = [_template_dict(m) for m in messages]
        return self.tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generate, **extra)

    def count_prefix(self, messages: list[ChatMessage], head: list[ChatMessage],
                     tools: list[Tool] | None = None) -> int:
        """Prompt tokens up to the end of `head`, a truncation of `messages` (a cache_control mark):
        the tokens of the longest text the two renderings share."""
        full = self.text(messages, tools=tools)
        part = self.text(head, generate=False, tools=tools)
        n = next((i for i, (a, b) in enumerate(zip(full, part)) if a != b), min(len(full), len(part)))
        return len(self.tokenizer.encode(full[:n], add_special_tokens=False))


def reply_message(events: list) -> ChatMessage:
    """An answer's Text and Call events as the assistant turn a client sends back next time: its
    texts joined by newlines (as text blocks are), then its calls."""
    texts = [e.text for e in join_text(events) if isinstance(e, Text)]
    calls = tuple(e.call for e in events if isinstance(e, Call))
    return ChatMessage("assistant", "\n".join(t for t in texts if t), calls)


SYSTEM_REMINDER = "<system-reminder>\n{}\n</system-reminder>"


def reminders_as_user_turns(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Each system message after the first turn as a user turn wrapped in <system-reminder> (the
    form Claude Code itself uses for reminders); leading system messages stay system."""
    out, started = [], False
    for m in messages:
        if m.role == "system" and started:
            out.append(ChatMessage("user", SYSTEM_REMINDER.format(m.content)))
        else:
            started = started or m.role != "system"
            out.append(m)
    return out


def merge_turns(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Join consecutive messages of the same role into one turn (as the Anthropic API does); tool
    results and turns with tool calls stay separate (templates render them apart)."""
    runs: list[list[ChatMessage]] = []
    for m in messages:
        last = runs[-1][-1] if runs else None
        if last is not None and last.role == m.role and m.role != "tool" and not last.tool_calls:
            runs[-1].append(m)
        else:
            runs.append([m])
    # one join per turn: joining message by message is quadratic (minutes for 100,000 messages)
    return [run[0] if len(run) == 1 else ChatMessage(run[0].role, "\n\n".join(m.content for m in run),
                                                    run[-1].tool_calls) for run in runs]


def fallback_turns(messages: list[ChatMessage], tools: list[Tool] | None) -> list[ChatMessage]:
    """The fallback tool format as plain turns: the tool list appended to the system prompt, calls
    written after the assistant's text, results as user turns. A turn's text depends only on that
    turn (and the tool list), so each prompt extends the previous prompt and reply."""
    out = []
    if tools:
        block = fallback_system(tools)
        if messages and messages[0].role == "system":
            out.append(ChatMessage("system", messages[0].content + "\n\n" + block))
            messages = messages[1:]
        else:
            out.append(ChatMessage("system", block))
    for m in messages:
        if m.tool_calls:
            out.append(ChatMessage("assistant", m.content + call_text(m.tool_calls)))
        elif m.role == "tool":
            out.append(ChatMessage("user", result_text(m.content)))
        else:
            out.append(m)
    return out


def _template_dict(m: ChatMessage) -> dict:
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                           for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    return d


class Detokenizer:
    """Turns ids into text one token at a time, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Any):
        # The Rust tokenizer directly: transformers' decode wrapper costs more than the decode itself.
        self._decode = getattr(tokenizer, "backend_tokenizer", tokenizer).decode
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _text(self, ids: list[int]) -> str:
        return self._decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._text(self.ids[self.prefix_offset : self.read_offset])
        full = self._text(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self._text(self.ids[self.prefix_offset : self.read_offset])
        full = self._text(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class StopMatcher:
    """Finds stop strings across chunk boundaries; text that might start a stop string is held back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._markers = Markers(self.stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Return (text safe to emit, matched stop string or None). After a match, stop feeding."""
        if not self.stops:
            return text, None
        buf = self.pending + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            index, stop = min(hits)
            self.pending = ""
            return buf[:index], stop
        keep = self._markers.held_back(buf)
        self.pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
