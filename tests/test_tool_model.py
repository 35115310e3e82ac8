"""Tool use on the real embedded model (SmolLM2, whose template has no tools: the fallback format):
a full round trip through both SDKs, tool_choice enforced by the grammar, the agent cache across
tool turns, and JSON response_format."""

from __future__ import annotations

import json

import pytest

from semcache.http.app import make_app
from semcache.ops.config import Config
from tests.conftest import serve_in_thread

pytestmark = pytest.mark.model

WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                            "required": ["city"]}}
TIME = {"name": "get_time", "description": "Get the current time in a time zone",
        "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}
GREEDY = {"temperature": 0}
QUESTION = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    with serve_in_thread(make_app(Config(cache_dir=str(tmp_path_factory.mktemp("cache"))))) as url:
        yield url


def test_round_trip_call_result_answer_with_cache_hits(claude):
    """any forces a valid call; the result goes back; the answer is text; turn 2 reuses turn 1's
    prompt and the call's tokens from the agent cache."""
    agent = {"X-Agent-ID": "tool-round-trip"}
    first = claude.messages.create(model="m", max_tokens=64, messages=QUESTION, tools=[WEATHER],
                                   tool_choice={"type": "any"}, extra_body=GREEDY, extra_headers=agent)
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert uses and uses[0].name == "get_weather"
    assert isinstance(uses[0].input["city"], str) and uses[0].input["city"]
    history = QUESTION + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "Sunny, 24 C"}
                                     for u in uses]},
    ]
    second = claude.messages.create(model="m", max_tokens=48, messages=history, tools=[WEATHER],
                                    tool_choice={"type": "none"}, extra_body=GREEDY, extra_headers=agent)
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in second.content] == ["text"] and second.content[0].text.strip()
    turn1_prompt = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens > turn1_prompt  # the prompt and part of the call were reused


def test_named_tool_is_the_one_called(claude):
    msg = claude.messages.create(model="m", max_tokens=64, messages=QUESTION, tools=[WEATHER, TIME],
                                 tool_choice={"type": "tool", "name": "get_time"}, extra_body=GREEDY)
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert uses and {u.name for u in uses} == {"get_time"} and isinstance(uses[0].input["zone"], str)


def test_openai_stream_helper_with_required_tool_choice(oai):
    tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                               "parameters": t["input_schema"]}} for t in (WEATHER, TIME)]
    with oai.chat.completions.stream(model="m", messages=QUESTION, tools=tools, tool_choice="required",
                                     max_tokens=64, temperature=0, parallel_tool_calls=False) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)


def test_json_schema_response_format(oai):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    resp = oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Invent a person."}], max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    person = json.loads(resp.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)


def test_tools_with_a_structured_output_get_a_call_or_schema_valid_json(oai):
    """openai-agents sends tools and response_format together (an agent with a function tool and
    an output_type): every answer is a valid call, or JSON matching the schema, never free text."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "summary": {"type": "string"}},
              "required": ["city", "summary"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                               "parameters": WEATHER["input_schema"]}}]
    for question in ("What is the weather in Paris right now?", "Summarise: Paris is sunny today."):
        resp = oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": question}], max_tokens=96, temperature=0, tools=tools,
            parallel_tool_calls=False,
            response_format={"type": "json_schema", "json_schema": {"name": "report", "schema": schema}})
        message = resp.choices[0].message
        if message.tool_calls:
            assert resp.choices[0].finish_reason == "tool_calls"
            assert isinstance(json.loads(message.tool_calls[0].function.arguments)["city"], str)
        else:
            report = json.loads(message.content)
            assert set(report) == {"city", "summary"}
