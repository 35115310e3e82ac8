"""An Anthropic message's content blocks, whole or streamed: thinking (reasoning models), text and
tool_use, in the order the answer produced them, with sequential indices when streamed."""

from __future__ import annotations

from semcache.http import sse
from semcache.text.reasoning import Thinking, signature
from semcache.text.tools import Text, ToolCall


def tool_use(call: ToolCall) -> dict:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}


def content(events: list, fingerprint: str) -> list[dict]:
    """The blocks of a whole answer (at least one: an empty text block)."""
    blocks = []
    for event in events:
        if isinstance(event, Thinking):
            blocks.append({"type": "thinking", "thinking": event.text, "signature": signature(event.text, fingerprint)})
        elif isinstance(event, Text):
            blocks.append({"type": "text", "text": event.text})
        else:
            blocks.append(tool_use(event.call))
    return blocks if any(b["type"] != "thinking" for b in blocks) else blocks + [{"type": "text", "text": ""}]


class Blocks:
    """Content blocks of a streamed message, opened and closed in order with sequential indices. A
    thinking block ends with its signature (signature_delta), as Anthropic's do."""

    def __init__(self, write, fingerprint: str):
        self.write = write
        self.fingerprint = fingerprint
        self.index = -1
        self.open = ""  # the kind of the open block ("text", "thinking") or ""
        self._thought: list[str] = []

    async def _send(self, event: dict) -> None:
        await self.write(sse.frame(event, event["type"]))

    async def _start(self, block: dict) -> None:
        await self.close()
        self.index += 1
        self.open = block["type"]
        await self._send({"type": "content_block_start", "index": self.index, "content_block": block})

    async def _delta(self, delta: dict) -> None:
        await self._send({"type": "content_block_delta", "index": self.index, "delta": delta})

    async def text(self, text: str) -> None:
        if self.open != "text":
            await self._start({"type": "text", "text": ""})
        if text:
            await self._delta({"type": "text_delta", "text": text})

    async def thinking(self, text: str) -> None:
        if self.open != "thinking":
            await self._start({"type": "thinking", "thinking": "", "signature": ""})
            self._thought = []
        self._thought.append(text)
        await self._delta({"type": "thinking_delta", "thinking": text})

    async def tool_use(self, call: ToolCall) -> None:
        await self._start({**tool_use(call), "input": {}})
        await self._delta({"type": "input_json_delta", "partial_json": call.arguments_json()})
        await self.close()

    async def emit(self, events: list) -> None:
        for event in events:
            if isinstance(event, Thinking):
                await self.thinking(event.text)
            elif isinstance(event, Text):
                await self.text(event.text)
            else:
                await self.tool_use(event.call)

    async def close(self) -> None:
        if self.open == "thinking":
            await self._delta({"type": "signature_delta", "signature": signature("".join(self._thought), self.fingerprint)})
        if self.open:
            await self._send({"type": "content_block_stop", "index": self.index})
            self.open = ""

    async def finish(self) -> None:
        """Close the open block; a message always has a text or tool_use block (an empty text)."""
        if self.index < 0 or self.open == "thinking":
            await self.text("")
        await self.close()
