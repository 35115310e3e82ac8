"""Constrained decoding with llguidance: tool_choice and response_format become a grammar, and a
sequence that has one samples only tokens its grammar allows.

Why llguidance (measured on the project VM, embedded SmolLM2 tokenizer, 49,152 tokens): it has no
dependencies; building its tokenizer takes 0.35 s once per model; compiling a tool's JSON-schema
grammar takes 1-2 ms, so every request can have its own; a token mask costs 22-34 us (1.7 ms for the
first). xgrammar needs torch, triton and transformers (torch alone is a multi-GB download here);
outlines-core needs our own byte-level vocabulary conversion and builds a 70-100 ms index per schema.

The tool grammars write calls exactly as tools.call_text does (canonical JSON, keys in schema order,
", " and ": " separators), so a constrained call re-renders to the same tokens in the next turn.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from semcache.text.tools import Tool, ToolChoice, ToolFormat

# Canonical JSON as json.dumps writes it: the same bytes whether generated or re-rendered.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")

# What one request's grammar may cost; past any of these it is a 400 (a tool list falls back to its
# loose form first), never a stall. Measured here, Claude Code's 12 tools need about 450 symbols,
# 5,000 initial fuel, 10,000 step fuel, 100 items and 300 lexer states; ten times as many tools, ten
# times that. llguidance's defaults are in brackets; its speeds are its own documentation's.
MAX_GRAMMAR_CHARS = 1 << 20  # the grammar's text, refused before llguidance parses it
LIMITS = {
    "max_grammar_size": 50_000,  # symbols of the compiled grammar [500,000]
    "initial_lexer_fuel": 300_000,  # compile time: regex analysis, ~50,000 a ms [1,000,000]
    "step_lexer_fuel": 50_000,  # mask time: ~14,000 a ms, so under ~4 ms a token [200,000]
    "step_max_items": 20_000,  # mask time: Earley items, ~20,000 a ms [50,000]
    "max_items_in_row": 2_000,  # branching of one parse row [2,000]
    "max_lexer_states": 20_000,  # memory: 1-2 kB a state, so under ~40 MB a request [250,000]
}


class GrammarError(ValueError):
    """A grammar or schema llguidance cannot compile (the request's fault: a 400)."""


def _literal(text: str) -> str:
    return json.dumps(text)


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _call_schema(tool: Tool, loose: bool = False) -> dict:
    arguments = tool.parameters or {"type": "object"}
    if loose:  # a schema llguidance cannot compile: still an object with its required keys
        listed = arguments.get("required")
        required = [k for k in listed if isinstance(k, str)] if isinstance(listed, list) else []
        arguments = {"type": "object", "properties": {k: {} for k in required}, "required": required}
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def _body_schema(tools: list[Tool], loose: bool) -> dict:
    alternatives = [_call_schema(t, loose) for t in tools]
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    return {**schema, "x-guidance": _JSON_OPTIONS}


def tool_grammar(fmt: ToolFormat, tools: list[Tool], choice: ToolChoice, loose: bool = False) -> str | None:
    """A lark grammar enforcing `choice` over the model's call format, or None when nothing needs
    enforcing (auto with a format whose calls are not JSON)."""
    start, end = fmt.start, fmt.end
    no_call = f"NOCALL: /(?s:.*)/ & ~/(?s:.*{_regex_escape(start)}.*)/\n"
    if choice.mode == "none":
        return "start: NOCALL\n" + no_call
    if not fmt.json_body:
        if choice.mode == "auto":
            return None
        return f"start: {_literal(start)} REST\nREST: /(?s:.*)/\n"  # a call is opened; its body is free
    if choice.mode == "tool":
        tools = [t for t in tools if t.name == choice.name]
    body = f"body: %json {json.dumps(_body_schema(tools, loose))}\n"
    close = _literal(f"\n{end}")
    more = f'({_literal(chr(10) + start + chr(10))} body {close})*' if choice.parallel else ""
    if choice.mode == "auto":
        return (f"start: text {_literal(chr(10))} body {close} {more} | NOCALL\n"
                f"text[suffix={_literal(start)}]: /(?s:.*)/\n" + no_call + body)
    return f"start: {_literal(start + chr(10))} body {close} {more}\n" + body


def json_grammar(schema: dict | None) -> str:
    """OpenAI response_format: any JSON object, or one matching `schema`."""
    return f"start: %json {json.dumps(_answer_schema(schema))}\n"


def _answer_schema(schema: dict | None) -> dict:
    schema = dict(schema) if schema else {"type": "object"}
    schema.setdefault("x-guidance", {"whitespace_flexible": True})
    return schema


def tool_or_json_grammar(fmt: ToolFormat, tools: list[Tool], choice: ToolChoice, schema: dict | None,
                         loose: bool = False) -> str:
    """Tools and response_format together (an agent with tools and a structured output, as
    openai-agents sends): the answer is a tool call, or JSON matching `schema`; never free text.
    tool_choice none leaves only the JSON; required or a named tool leaves only the call."""
    if choice.mode == "none":
        return json_grammar(schema)
    if choice.mode != "auto":
        return tool_grammar(fmt, tools, choice, loose) or json_grammar(schema)
    answer = f"answer: %json {json.dumps(_answer_schema(schema))}\n"
    if not fmt.json_body:
        return f"start: call | answer\ncall: {_literal(fmt.start)} REST\nREST: /(?s:.*)/\n" + answer
    forced = tool_grammar(fmt, tools, ToolChoice("required", None, choice.parallel), loose)
    return forced.replace("start:", "call:", 1) + "start: call | answer\n" + answer


class Constraint:
    """One sequence's grammar state: which tokens may come next; advanced by each sampled token."""

    def __init__(self, matcher: Any, vocab: int):
        self._matcher = matcher
        self._vocab = vocab
        words = (vocab + 31) // 32
        self._bits = np.zeros(words, dtype=np.int32)

    def copy(self) -> Constraint:
        """Another sequence's constraint from the same grammar, without compiling it again."""
        return Constraint(self._matcher.deep_copy(), self._vocab)

    def error(self) -> str:
        """Why the grammar cannot go on ("" while it can): a limit it hit, say."""
        error = self._matcher.get_error()
        return error.splitlines()[0] if error else ""

    def allowed(self, width: int) -> np.ndarray:
        """A bool mask of `width` (the logits' width, which may exceed the tokenizer's vocabulary)."""
        import llguidance.numpy as lnp

        lnp.fill_next_token_bitmask(self._matcher, self._bits.reshape(1, -1), 0)
        mask = np.unpackbits(self._bits.view(np.uint8), bitorder="little").astype(bool)
        if mask.size >= width:
            return mask[:width]
        return np.concatenate([mask, np.zeros(width - mask.size, dtype=bool)])

    def advance(self, token: int) -> bool:
        """Record a sampled token; False if the grammar rejects it (it cannot, when masked)."""
        return bool(self._matcher.consume_token(int(token)))



class Grammars:
    """Compiles grammars for one model's tokenizer; the llguidance tokenizer is built on first use."""

    def __init__(self, tokenizer: Any, eos_ids: set[int] | frozenset[int]):
        self._tokenizer = tokenizer
        self._eos = sorted(eos_ids)
        self._ll: Any = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                import llguidance

                backend = self._tokenizer.backend_tokenizer
                self._ll = llguidance.LLTokenizer(backend.to_str(), eos_token=self._eos or None)
            return self._ll

    def compile(self, grammar: str) -> Constraint:
        """A constraint for `grammar`, its first mask computed here (off the engine's thread): a
        grammar past LIMITS, at compile time or in that mask, is a GrammarError."""
        import llguidance

        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the grammar is {len(grammar):,} characters, over the limit of "
                               f"{MAX_GRAMMAR_CHARS:,}")
        ll = self._ll_tokenizer()
        try:
            matcher = llguidance.LLMatcher(ll, grammar, limits=llguidance.LLParserLimits(**LIMITS), log_level=0)
        except Exception as exc:  # a schema it cannot take (the request's), never a 500
            raise GrammarError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        constraint = Constraint(matcher, ll.vocab_size)
        if not constraint.error():
            constraint.allowed(ll.vocab_size)
        if constraint.error():
            raise GrammarError(constraint.error())
        return constraint

    def for_tools(self, fmt: ToolFormat, tools: list[Tool], choice: ToolChoice,
                  answer_schema: dict | None = None, json_answer: bool = False) -> Constraint | None:
        """The constraint enforcing `choice` (with `json_answer`: a call, or JSON matching
        `answer_schema`); a tool schema llguidance cannot compile falls back to 'an object with the
        required keys' rather than failing the request."""
        def grammar(loose: bool) -> str | None:
            if json_answer:
                return tool_or_json_grammar(fmt, tools, choice, answer_schema, loose)
            return tool_grammar(fmt, tools, choice, loose)

        if grammar(False) is None:
            return None
        try:
            return self.compile(grammar(False))
        except GrammarError:
            return self.compile(grammar(True))
