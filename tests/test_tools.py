"""Tool calls in generated text (CallScanner, formats) and tool_choice grammars on the real tokenizer."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from semcache.text.grammar import Grammars, json_grammar
from semcache.text.tools import (
    FALLBACK,
    Call,
    CallScanner,
    Text,
    Tool,
    ToolCall,
    ToolChoice,
    ToolFormat,
    call_text,
    join_text,
)
from semcache.engine.toolformat import format_for

WEATHER = Tool("get_weather", "Current weather in a city",
               {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"]})
ADD = Tool("add", "Add two integers", {"type": "object", "properties": {"a": {"type": "integer"},
                                                                         "b": {"type": "integer"}},
                                       "required": ["a", "b"]})
TOOLS = [WEATHER, ADD]
CALL = call_text([ToolCall("x", "get_weather", {"city": "Paris"})])


def scan(text: str, chunks: list[int] | None = None, fmt: ToolFormat = FALLBACK) -> list:
    """Feed `text` in pieces cut at `chunks` (offsets), merge the events."""
    scanner = CallScanner(fmt, TOOLS, "toolu_")
    cuts = [0, *(chunks or []), len(text)]
    events = []
    for a, b in zip(cuts, cuts[1:]):
        events += scanner.feed(text[a:b])
    return join_text(events + scanner.flush())


def test_text_then_call_at_every_split_point():
    text = "Let me check." + CALL
    for cut in range(len(text) + 1):
        events = scan(text, [cut])
        assert [type(e) for e in events] == [Text, Call], cut
        assert events[0].text == "Let me check."
        call = events[1].call
        assert (call.name, call.arguments) == ("get_weather", {"city": "Paris"})
        assert call.id.startswith("toolu_") and len(call.id) > 10


def test_streamed_text_is_not_held_back_longer_than_a_possible_marker():
    scanner = CallScanner(FALLBACK, TOOLS, "call_")
    assert scanner.feed("Hello <tool") == [Text("Hello ")]  # "<tool" might open a call
    assert scanner.feed("box> world") == [Text("<toolbox> world")]
    assert scanner.flush() == []


def test_parallel_calls_and_canonical_text():
    calls = [ToolCall("1", "get_weather", {"city": "Oslo", "unit": "c"}), ToolCall("2", "add", {"a": 1, "b": 2})]
    text = call_text(calls)
    assert text == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>\n'
                    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    events = scan(text, [7, 50, 90])
    assert [(e.call.name, e.call.arguments) for e in events] == [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("body", [
    '{"name": "get_weather", "arguments": {"city": "Paris"}',  # truncated JSON
    '{"name": "launch_missiles", "arguments": {}}',  # not a declared tool
    '{"name": "get_weather", "arguments": [1, 2]}',  # arguments not an object
    'get_weather(city="Paris")',  # not JSON at all
])
def test_invalid_calls_stay_text(body):
    text = f"Sure. <tool_call>\n{body}\n</tool_call> done"
    assert scan(text, [10, 30]) == [Text(text)]


def test_a_call_cut_off_by_max_tokens_is_text():
    text = 'Ok <tool_call>\n{"name": "add", "argu'
    assert scan(text) == [Text(text)]


def test_arguments_given_as_a_json_string_are_decoded():
    events = scan('<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>')
    assert events[0].call.arguments == {"a": 1, "b": 2}


def test_format_without_end_marker_runs_to_the_end():
    fmt = ToolFormat("[TOOL_CALLS]", "", native=True, json_body=False,
                     _parse=lambda text, tools: json.loads(text))
    events = scan('Hi [TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', [5, 20], fmt)
    assert events[0] == Text("Hi ") and events[1].call.arguments == {"a": 1, "b": 2}


def test_format_for_smollm2_is_the_fallback(tokenizer):
    assert format_for(tokenizer) is FALLBACK


def test_format_for_a_hermes_style_template_uses_mlx_lm_json_tools(tokenizer):
    class Qwenish:
        chat_template = ("{% if tools %}{% for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}"
                         "{% for tool_call in message.tool_calls %}<tool_call>{{ tool_call.name }}</tool_call>"
                         "{% endfor %}")

        def get_vocab(self):
            return {}

    fmt = format_for(Qwenish())
    assert fmt.native and fmt.json_body and (fmt.start, fmt.end) == ("<tool_call>", "</tool_call>")


# Grammars on the real tokenizer ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, {tokenizer.eos_token_id})


def walk(tokenizer, constraint, text: str) -> bool:
    """Feed `text`'s tokens; False at the first token the grammar masks."""
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not constraint.allowed(len(tokenizer))[token]:
            return False
        assert constraint.advance(token)
    return True


def allowed_ids(tokenizer, constraint) -> np.ndarray:
    return constraint.allowed(len(tokenizer) + 64).nonzero()[0]


def test_required_forces_a_call_and_then_only_the_end(tokenizer, grammars):
    c = grammars.for_tools(FALLBACK, TOOLS, ToolChoice("required"))
    assert not walk(tokenizer, grammars.for_tools(FALLBACK, TOOLS, ToolChoice("required")), "Sure, ")
    assert walk(tokenizer, c, call_text([ToolCall("1", "add", {"a": 1, "b": 2})]))
    allowed = allowed_ids(tokenizer, c)
    assert tokenizer.eos_token_id in allowed and len(allowed) <= 2  # end, or "\n" for a parallel call
    assert allowed.max() < len(tokenizer)  # logits wider than the vocabulary: the padding is masked


def test_named_tool_forces_that_tool_and_its_required_keys(tokenizer, grammars):
    c = lambda: grammars.for_tools(FALLBACK, TOOLS, ToolChoice("tool", "add", parallel=False))  # noqa: E731
    assert not walk(tokenizer, c(), call_text([ToolCall("1", "get_weather", {"city": "Paris"})]))
    assert not walk(tokenizer, c(), '<tool_call>\n{"name": "add", "arguments": {"a": 1}}')
    assert not walk(tokenizer, c(), '<tool_call>\n{"name": "add", "arguments": {"a": "one", ')
    done = c()
    assert walk(tokenizer, done, call_text([ToolCall("1", "add", {"a": 1, "b": 2})]))
    assert list(allowed_ids(tokenizer, done)) == [tokenizer.eos_token_id]  # not parallel: no second call


def test_none_masks_the_call_opener_only(tokenizer, grammars):
    c = grammars.for_tools(FALLBACK, TOOLS, ToolChoice("none"))
    assert walk(tokenizer, c, "Plain text, even <tool and <tool_cal and </tool_call> are fine. ")
    assert not walk(tokenizer, c, "<tool_call>")


def test_auto_allows_text_or_text_then_a_valid_call(tokenizer, grammars):
    assert walk(tokenizer, grammars.for_tools(FALLBACK, TOOLS, ToolChoice("auto")), "Just an answer.")
    c = grammars.for_tools(FALLBACK, TOOLS, ToolChoice("auto"))
    assert walk(tokenizer, c, "Let me look." + CALL)
    assert not walk(tokenizer, grammars.for_tools(FALLBACK, TOOLS, ToolChoice("auto")),
                    'Hm.<tool_call>\n{"name": "nope"')


def test_a_schema_llguidance_cannot_compile_still_gets_an_object_with_required_keys(tokenizer, grammars):
    odd = Tool("odd", "", {"type": "object", "properties": {"x": {"$ref": "http://example.com/x.json"}},
                           "required": ["x"]})
    c = grammars.for_tools(FALLBACK, [odd], ToolChoice("required"))
    assert walk(tokenizer, c, call_text([ToolCall("1", "odd", {"x": [1, "two"]})]))


def test_json_response_format(tokenizer, grammars):
    c = grammars.compile(json_grammar({"type": "object", "properties": {"n": {"type": "integer"}},
                                       "required": ["n"]}))
    assert not walk(tokenizer, c, "Sure")
    c = grammars.compile(json_grammar(None))
    assert walk(tokenizer, c, '{"any": ["json", 1]}')


def test_a_repeated_call_ends_the_answer():
    scanner = CallScanner(FALLBACK, TOOLS, "toolu_")
    other = call_text([ToolCall("y", "add", {"a": 1, "b": 2})])
    events = scanner.feed(CALL + "\n" + other + "\n" + CALL + "\n<tool_call>\n{") + scanner.flush()
    assert [e.call.name for e in events] == ["get_weather", "add"]
    assert scanner.done and scanner.feed("more text") == []


@pytest.mark.parametrize("schema", [
    {"type": "object", "required": None},
    {"type": "object", "properties": {"x": {"type": "no-such-type"}}, "required": "x"},
    {"type": "object", "properties": None, "required": [1, None, "x"]},
])
def test_hostile_tool_schemas_still_compile_or_fail_cleanly(grammars, schema):
    from semcache.text.grammar import GrammarError

    try:
        assert grammars.for_tools(FALLBACK, [Tool("t", "", schema)], ToolChoice("required")) is not None
    except GrammarError:
        pass  # the request gets a 400 naming tools


def test_tools_with_a_json_answer_allow_a_call_or_the_json_only(tokenizer, grammars):
    """tools + response_format (openai-agents' output_type): auto allows a valid call, or JSON
    matching the schema; free text, invalid JSON and unknown tools are masked."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}

    def union(mode="auto"):
        return grammars.for_tools(FALLBACK, TOOLS, ToolChoice(mode), schema, json_answer=True)

    assert walk(tokenizer, union(), call_text([ToolCall("1", "add", {"a": 1, "b": 2})]))
    assert walk(tokenizer, union(), '{"n": 3}')
    assert not walk(tokenizer, union(), "Sure, ")
    assert not walk(tokenizer, union(), '{"n": "three"')
    assert not walk(tokenizer, union(), '<tool_call>\n{"name": "nope"')
    assert not walk(tokenizer, union("none"), "<tool_call>") and walk(tokenizer, union("none"), '{"n": 1}')
    assert not walk(tokenizer, union("required"), '{"n": 1}')


def test_a_copied_constraint_has_its_own_state(tokenizer, grammars):
    """OpenAI's n choices share one compiled grammar: each gets a copy that advances on its own."""
    first = grammars.compile(json_grammar({"type": "object", "properties": {"n": {"type": "integer"}},
                                           "required": ["n"]}))
    second = first.copy()
    assert walk(tokenizer, first, '{"n": 3}')
    assert list(allowed_ids(tokenizer, first)) == [tokenizer.eos_token_id]
    assert not walk(tokenizer, second, "}") and walk(tokenizer, second.copy(), '{"n": 12}')


def tree(depth: int) -> dict:
    """A schema whose every level is an object or an array of the level below: a grammar that grows
    twice with each level."""
    if depth == 0:
        return {"type": "string"}
    return {"anyOf": [{"type": "object", "properties": {"k": tree(depth - 1)}, "required": ["k"]},
                      {"type": "array", "items": tree(depth - 1)}]}


@pytest.mark.parametrize("schema, says", [
    ({"type": "object", "properties": {"a": {"enum": ["x" * 100] * 11_000}}}, "over the limit of 1,048,576"),
    (tree(12), "grammar size (number of symbols) too big"),  # 0.5 MB of grammar, compiled in ~0.2 s
    ({"enum": [f"value-{i}" for i in range(50_000)]}, "initial lexer configuration (grammar) too big"),
], ids=["grammar text", "grammar size", "compile fuel"])
def test_a_schema_past_a_grammar_limit_is_refused_quickly(grammars, schema, says):
    """Each limit on a grammar's cost (text.grammar.LIMITS) turns a schema that hits it into a
    GrammarError (a 400) in well under a second, never a compile that runs for seconds."""
    from semcache.text.grammar import GrammarError

    start = time.perf_counter()
    with pytest.raises(GrammarError, match=re.escape(says)):
        grammars.compile(json_grammar(schema))
    assert time.perf_counter() - start < 2.0  # ~0.3 s here


def test_a_grammar_whose_mask_is_past_the_step_limit_is_refused_at_compile(grammars, monkeypatch):
    """The first mask is computed when the grammar is compiled (off the engine's thread): a grammar
    whose masks exceed the per-token limits is a GrammarError then, not a stall of every step. No
    schema under the size and compile limits reaches them, so the limit is lowered to show it."""
    from semcache.text import grammar

    monkeypatch.setitem(grammar.LIMITS, "step_max_items", 500)
    choices = {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "string"}}, "required": [f"k{i}"]}
                         for i in range(1_000)]}
    with pytest.raises(grammar.GrammarError, match="Too many items"):
        grammars.compile(json_grammar(choices))


def test_a_tool_list_past_the_limits_falls_back_to_its_loose_grammar(tokenizer, grammars):
    """Tools whose schemas are too costly to enforce still get a call of a declared tool (with its
    required keys); only the schemas' details go unenforced."""
    big = Tool("big", "", {"type": "object", "properties": {"a": {"enum": [f"v{i}" for i in range(50_000)]}},
                           "required": ["a"]})
    c = grammars.for_tools(FALLBACK, [big], ToolChoice("required"))
    assert walk(tokenizer, c, call_text([ToolCall("1", "big", {"a": "anything"})]))
