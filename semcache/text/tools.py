"""Tool use, dialect-neutral: tool specs and calls, how a model is prompted with them, and how its
calls are found in the text it generates (streamed or not).

Two kinds of model:
- Templates that take `tools=` (Qwen, Hermes, Llama 3.1, ...): the template renders the tool list
  and earlier calls; mlx-lm's `tool_parsers` module for the family (found the way mlx-lm does)
  gives the call markers and the parser.
- Templates that don't (the embedded SmolLM2): the FALLBACK format. The tool list is appended to
  the system prompt in one fixed text, calls are `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>` with canonical JSON (`json.dumps` defaults: ", " and ": " separators, keys in the
  order given), results are user turns wrapped in `<tool_response>`. The text of a turn depends only
  on that turn and the tool list, so every turn's tokens extend the previous turn's prompt and reply
  and the agent cache keeps hitting.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from semcache.text.holdback import Markers

FALLBACK_START, FALLBACK_END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema for the arguments object

    def openai(self) -> dict:
        """The OpenAI function-tool shape that chat templates and mlx-lm's parsers take."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict

    def arguments_json(self) -> str:
        return canonical(self.arguments)


@dataclass(frozen=True)
class ToolChoice:
    """auto: the model decides; none: no call; required: at least one call, any tool; tool: one
    call of `name`. `parallel` allows several calls in one turn."""

    mode: Literal["auto", "none", "required", "tool"] = "auto"
    name: str | None = None
    parallel: bool = True


def canonical(value: Any) -> str:
    """The one JSON spelling of arguments in prompts and in constrained calls."""
    return json.dumps(value, ensure_ascii=False)


def new_call_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass
class ToolFormat:
    """How one model family writes calls: markers around each call and a parser for what is between."""

    start: str
    end: str
    native: bool  # the chat template renders tools and calls itself
    json_body: bool  # calls are {"name", "arguments"} JSON objects (constrained decoding applies)
    _parse: Callable[[str, Any], Any] | None = field(default=None, repr=False)

    def parse(self, body: str, tools: list[Tool]) -> list[tuple[str, dict]] | None:
        """(name, arguments) of the call(s) between the markers, or None when it is not a valid call
        of a declared tool (the text then stays text)."""
        try:
            parsed = self._parse(body, [t.openai() for t in tools]) if self._parse else json.loads(body.strip())
        except Exception:  # a parser failing on model output is the model's mistake, never ours
            return None
        items = parsed if isinstance(parsed, list) else [parsed]
        names = {t.name for t in tools}
        out = []
        for item in items:
            if not isinstance(item, dict) or item.get("name") not in names:
                return None
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            if not isinstance(arguments, dict):
                return None
            out.append((item["name"], arguments))
        return out or None


FALLBACK = ToolFormat(FALLBACK_START, FALLBACK_END, native=False, json_body=True)


# The fallback prompt -----------------------------------------------------------------------------

def fallback_system(tools: list[Tool]) -> str:
    """The fixed tool block appended to the system prompt (one JSON line per tool)."""
    lines = "\n".join(canonical(t.openai()) for t in tools)
    return (
        "# Tools\n\nYou can call functions to help with the user's request. The functions you can call "
        f"are listed, one JSON object per line, between <tools> and </tools>:\n<tools>\n{lines}\n</tools>\n\n"
        "To call a function, answer with a JSON object holding its name and its arguments between "
        f"{FALLBACK_START} and {FALLBACK_END}, like this:\n"
        f'{FALLBACK_START}\n{{"name": "function name", "arguments": {{"argument": "value"}}}}\n{FALLBACK_END}\n'
        "The results come back between <tool_response> and </tool_response>."
    )


def call_text(calls: tuple[ToolCall, ...] | list[ToolCall], fmt: ToolFormat = FALLBACK) -> str:
    """Calls as the model writes them (and as constrained decoding forces them), joined by newlines."""
    return "\n".join(f"{fmt.start}\n{canonical({'name': c.name, 'arguments': c.arguments})}\n{fmt.end}"
                     for c in calls)


def result_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


# Finding calls in generated text -------------------------------------------------------------------

@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Call:
    call: ToolCall


class CallScanner:
    """Splits streamed text into Text and Call events. Text that might be the start of a call marker
    is held back; a call's raw text is never also emitted as text, unless it does not parse, in
    which case it comes out as text (never an error). A call repeating an earlier call of the turn
    (same name and arguments, which small models do in a loop) ends the answer: `done` is set, the
    repeat is dropped and the caller stops generating."""

    def __init__(self, fmt: ToolFormat, tools: list[Tool], id_prefix: str):
        self.fmt, self.tools, self.id_prefix = fmt, tools, id_prefix
        self._opening = Markers((fmt.start,))  # the opening tag a call may still turn out to be
        self._buf = ""
        self._in_call = False
        self.calls: list[ToolCall] = []
        self.done = False
        self._after_call = False  # the next "\n" separates parallel calls: not text

    def feed(self, text: str) -> list[Text | Call]:
        if self.done:
            return []
        self._buf += text
        out: list[Text | Call] = []
        while not self.done:
            if not self._in_call:
                if self._after_call and self._buf:
                    self._after_call = False
                    self._buf = self._buf[1:] if self._buf.startswith("\n") else self._buf
                i = self._buf.find(self.fmt.start)
                if i < 0:
                    keep = self._opening.held_back(self._buf)
                    self._emit_text(out, self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._emit_text(out, self._buf[:i])
                self._buf = self._buf[i:]
                self._in_call = True
            if not self.fmt.end:  # the call runs to the end of the reply (Mistral's [TOOL_CALLS])
                return out
            j = self._buf.find(self.fmt.end, len(self.fmt.start))
            if j < 0:
                return out
            raw = self._buf[: j + len(self.fmt.end)]
            self._buf = self._buf[j + len(self.fmt.end):]
            self._in_call = False
            self._finish(out, raw)
            self._after_call = bool(self.calls)
        return out

    def flush(self) -> list[Text | Call]:
        """End of generation: an unfinished call is text (a call cut off by max_tokens, say)."""
        out: list[Text | Call] = []
        if self.done:
            return out
        if self._in_call and not self.fmt.end:
            self._finish(out, self._buf)
        else:
            self._emit_text(out, self._buf)
        self._buf, self._in_call = "", False
        return out

    def _finish(self, out: list, raw: str) -> None:
        parsed = self.fmt.parse(raw[len(self.fmt.start): len(raw) - len(self.fmt.end)], self.tools)
        if parsed is None:
            self._emit_text(out, raw)
            return
        for name, arguments in parsed:
            if any(c.name == name and c.arguments == arguments for c in self.calls):
                self.done = True
                return
            call = ToolCall(new_call_id(self.id_prefix), name, arguments)
            self.calls.append(call)
            out.append(Call(call))

    @staticmethod
    def _emit_text(out: list, text: str) -> None:
        if text:
            if out and isinstance(out[-1], Text):
                out[-1] = Text(out[-1].text + text)
            else:
                out.append(Text(text))


async def collect(deltas: AsyncIterator[str], scanner: CallScanner | None) -> list[Text | Call]:
    """All events of an answer (see `scanned`), adjacent text joined into one Text."""
    return join_text([event async for events in scanned(deltas, scanner) for event in events])


def join_text(events: list[Text | Call]) -> list[Text | Call]:
    """The events with adjacent Text joined into one."""
    out: list[Text | Call] = []
    for event in events:  # Text, or another text event (a reasoning model's thinking) alike
        if out and type(event) is type(out[-1]) and not isinstance(event, Call):
            out[-1] = type(event)(out[-1].text + event.text)
        else:
            out.append(event)
    return out


async def scanned(deltas: AsyncIterator[str], scanner: CallScanner | None) -> AsyncIterator[list[Text | Call]]:
    """Events of streamed text deltas: plain Text without a scanner; with one, its events, ending
    early when the scanner is done (the rest of the answer is not read). Items that are not text
    (a reasoning model's thinking) pass through as events of their own."""
    async for delta in deltas:
        if not isinstance(delta, str):
            yield [delta]
            continue
        events = scanner.feed(delta) if scanner else [Text(delta)]
        if events:
            yield events
        if scanner is not None and scanner.done:
            return
    tail = scanner.flush() if scanner else []
    if tail:
        yield tail
