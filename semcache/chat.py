"""Text side of generation: chat messages → token ids, incremental detokenizing, stop sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class PromptRenderer:
    """Renders a chat with the model's own template, then tokenizes without adding specials again."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def render(self, messages: list[ChatMessage], continue_final: bool = False, generate: bool = True) -> list[int]:
        """Token ids for `messages`. Consecutive turns of one role are joined (strict templates reject
        them); with `continue_final`, a trailing assistant message is continued, not closed; without
        `generate`, no assistant turn is opened (the warm-up prompt of /v1/agents/{id}/warm)."""
        return self.tokenizer.encode(self.text(messages, continue_final, generate), add_special_tokens=False)

    def text(self, messages: list[ChatMessage], continue_final: bool = False, generate: bool = True) -> str:
        messages = merge_turns(messages)
        prefill = ""
        if continue_final and messages and messages[-1].role == "assistant":
            prefill = messages[-1].content
            messages = messages[:-1]
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        return self.tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generate) + prefill

    def count_prefix(self, messages: list[ChatMessage], head: list[ChatMessage]) -> int:
        """Prompt tokens up to the end of `head`, a truncation of `messages` (a cache_control mark):
        the tokens of the longest text the two renderings share."""
        full = self.text(messages)
        part = self.text(head, generate=False)
        n = next((i for i, (a, b) in enumerate(zip(full, part)) if a != b), min(len(full), len(part)))
        return len(self.tokenizer.encode(full[:n], add_special_tokens=False))


def merge_turns(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Join consecutive messages of the same role into one turn (as the Anthropic API does)."""
    out: list[ChatMessage] = []
    for m in messages:
        if out and out[-1].role == m.role:
            out[-1] = ChatMessage(m.role, out[-1].content + "\n\n" + m.content)
        else:
            out.append(m)
    return out


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
        keep = self._held_back(buf)
        self.pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_back(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:n]):
                    longest = n
                    break
        return longest
