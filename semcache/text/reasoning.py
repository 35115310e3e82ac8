"""Reasoning models (Qwen3-style `<think>...</think>`): the answer's thinking split from its text.

A model reasons when its chat template knows the tags. Its output is `<think>` thinking `</think>`
then the answer (some templates open the tag in the generation prompt itself, so the output starts
inside it). Each dialect returns the thinking apart: Anthropic as a `thinking` block with a
signature, OpenAI as `reasoning_content`.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from semcache.text.holdback import Markers

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Thinking:
    text: str


def reasons(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and OPEN in template and CLOSE in template


def opens_thinking(prompt_text: str) -> bool:
    """The generation prompt already opened the thinking (the output starts inside it)."""
    return prompt_text.rstrip().endswith(OPEN)


def signature(thinking: str, fingerprint: str) -> str:
    """Deterministic: the same thinking from the same model always signs the same."""
    digest = hashlib.sha256(f"{fingerprint}\0{thinking}".encode()).digest()
    return base64.b64encode(digest).decode()


class ThinkSplitter:
    """Splits streamed text into Thinking pieces and answer text (str), holding back a partial tag."""

    def __init__(self, inside: bool = False):
        self.state = "opened" if inside else "start"
        self._buf = ""
        self._open, self._close = Markers((OPEN,)), Markers((CLOSE,))

    def feed(self, text: str) -> list[Thinking | str]:
        self._buf += text
        out: list[Thinking | str] = []
        while self._buf:
            if self.state == "start":
                head = self._buf.lstrip()
                if head.startswith(OPEN):
                    self._buf, self.state = head[len(OPEN):], "opened"
                elif OPEN.startswith(head):
                    return out  # maybe the opening tag: wait for more
                else:
                    self.state = "text"
            elif self.state in ("opened", "answer-start"):  # blank lines after a tag belong to neither
                self._buf = self._buf.lstrip("\n")
                if self._buf:
                    self.state = "thinking" if self.state == "opened" else "text"
            elif self.state == "thinking":
                i = self._buf.find(CLOSE)
                if i < 0:  # hold back a partial closing tag, and the newlines before it
                    tag = self._close.held_back(self._buf)
                    before = self._buf[: len(self._buf) - tag]
                    keep = tag + len(before) - len(before.rstrip("\n"))
                    _add(out, Thinking(self._buf[: len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                _add(out, Thinking(self._buf[:i].rstrip("\n")))
                self._buf, self.state = self._buf[i + len(CLOSE):].lstrip("\n"), "answer-start"
            else:
                out.append(self._buf)
                self._buf = ""
        return out

    def flush(self) -> list[Thinking | str]:
        """End of the answer: whatever is held back (a thinking cut off by max_tokens stays thinking)."""
        rest, self._buf = self._buf, ""
        if not rest:
            return []
        if self.state in ("opened", "thinking"):
            return [Thinking(rest)] if rest.strip("\n") else []
        return [rest] if self.state != "answer-start" else []


def _add(out: list, piece: Thinking) -> None:
    if piece.text:
        out.append(piece)


async def reasoned(deltas: AsyncIterator[str], splitter: ThinkSplitter) -> AsyncIterator[Thinking | str]:
    """The answer's deltas with its thinking split off as Thinking pieces."""
    async for delta in deltas:
        for piece in splitter.feed(delta):
            yield piece
    for piece in splitter.flush():
        yield piece
