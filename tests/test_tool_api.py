"""Tool use over HTTP: both SDKs against a server whose fake engine replays a canned tool call, the
prompt format's turn-over-turn stability (the agent cache), request validation."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from semcache.http.app import make_app
from semcache.text.chat import ChatMessage, PromptRenderer
from semcache.ops.config import Config
from semcache.text.tools import Tool, ToolCall, call_text
from tests.conftest import FakeEngine, serve_in_thread

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CLAUDE_TOOLS = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER_SCHEMA}]
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                   "parameters": WEATHER_SCHEMA}}]
CALL = call_text([ToolCall("x", "get_weather", {"city": "Paris"})])
REPLY = "I'll check." + CALL
USER = [{"role": "user", "content": "Weather in Paris?"}]


def post(url: str, body: dict) -> tuple[int, str]:
    """A plain POST with the Anthropic version header; (status, body text)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", "anthropic-version": "2023-06-01"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def base_url(tokenizer, tmp_path_factory):
    config = Config(cache_dir=str(tmp_path_factory.mktemp("cache")))
    with serve_in_thread(make_app(config, engine=FakeEngine(tokenizer, reply=REPLY))) as url:
        yield url


class TestAnthropic:
    def test_create_returns_text_then_tool_use(self, claude):
        msg = claude.messages.create(model="m", max_tokens=200, messages=USER, tools=CLAUDE_TOOLS)
        assert msg.stop_reason == "tool_use"
        assert [b.type for b in msg.content] == ["text", "tool_use"]
        assert msg.content[0].text == "I'll check."
        use = msg.content[1]
        assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")

    def test_stream_helper_final_message_has_the_tool_use(self, claude):
        with claude.messages.stream(model="m", max_tokens=200, messages=USER, tools=CLAUDE_TOOLS) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == "I'll check."  # the call's raw JSON is never streamed as text
        assert final.stop_reason == "tool_use"
        assert [b.type for b in final.content] == ["text", "tool_use"]
        assert final.content[1].input == {"city": "Paris"}

    def test_stream_events_in_order(self, base_url):
        body = {"model": "m", "max_tokens": 200, "messages": USER, "tools": CLAUDE_TOOLS, "stream": True}
        status, text = post(base_url + "/v1/messages", body)
        assert status == 200
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        kinds = [(e["type"], e.get("index")) for e in events if e["type"] != "ping"]
        assert kinds[0] == ("message_start", None)
        starts = [e for e in events if e["type"] == "content_block_start"]
        assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use"]
        assert starts[1]["content_block"]["input"] == {} and starts[1]["index"] == 1
        deltas = [e["delta"] for e in events if e["type"] == "content_block_delta" and e["index"] == 1]
        assert {d["type"] for d in deltas} == {"input_json_delta"}
        assert json.loads("".join(d["partial_json"] for d in deltas)) == {"city": "Paris"}
        stops = [e["index"] for e in events if e["type"] == "content_block_stop"]
        assert stops == [0, 1]
        assert events[-1]["type"] == "message_stop"
        assert next(e for e in events if e["type"] == "message_delta")["delta"]["stop_reason"] == "tool_use"

    def test_without_tools_the_text_is_plain(self, claude):
        msg = claude.messages.create(model="m", max_tokens=200, messages=USER)
        assert msg.stop_reason == "end_turn" and msg.content[0].text == REPLY

    def test_tool_history_round_trip(self, claude):
        first = claude.messages.create(model="m", max_tokens=200, messages=USER, tools=CLAUDE_TOOLS)
        use = first.content[1]
        history = USER + [{"role": "assistant", "content": first.content},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                        "content": "18 C and sunny"}]}]
        msg = claude.messages.create(model="m", max_tokens=200, messages=history, tools=CLAUDE_TOOLS)
        assert msg.stop_reason == "tool_use"
        blocks = [{"type": "text", "text": "oops"}]
        err = [{"type": "tool_result", "tool_use_id": use.id, "content": blocks, "is_error": True}]
        msg = claude.messages.create(model="m", max_tokens=200, tools=CLAUDE_TOOLS,
                                     messages=history[:2] + [{"role": "user", "content": err}])
        assert msg.content

    @pytest.mark.parametrize("change, param", [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"tools": [{"name": "x"}]}, "tools[0].input_schema"),
        ({"tools": CLAUDE_TOOLS * 2}, "tools[1].name"),
        ({"tools": CLAUDE_TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tools": CLAUDE_TOOLS, "tool_choice": {"type": "maybe"}}, "tool_choice"),
        ({"messages": USER + [{"role": "assistant", "content": "ok"},
                              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x",
                                                            "content": "hi"}]}],
          "tools": CLAUDE_TOOLS}, "messages[2].content[0].tool_use_id"),
    ])
    def test_bad_tool_requests_are_400_naming_the_field(self, base_url, change, param):
        body = {"model": "m", "max_tokens": 20, "messages": USER, **change}
        status, text = post(base_url + "/v1/messages", body)
        assert status == 400, text
        error = json.loads(text)["error"]
        assert error["type"] == "invalid_request_error" and param.split("[")[0] in error["message"], error


class TestOpenAI:
    def test_create_returns_tool_calls(self, oai):
        resp = oai.chat.completions.create(model="m", messages=USER, tools=OPENAI_TOOLS, max_tokens=200)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "I'll check."
        call = choice.message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    def test_named_tool_choice_finishes_with_stop(self, oai):
        resp = oai.chat.completions.create(model="m", messages=USER, tools=OPENAI_TOOLS, max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert resp.choices[0].finish_reason == "stop" and resp.choices[0].message.tool_calls

    def test_stream_helper_accumulates_tool_calls(self, oai):
        with oai.chat.completions.stream(model="m", messages=USER, tools=OPENAI_TOOLS, max_tokens=200) as stream:
            chunks = list(stream)
            final = stream.get_final_completion()
        deltas = [c.chunk.choices[0].delta for c in chunks if c.type == "chunk" and c.chunk.choices]
        fragments = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert fragments[0].id and fragments[0].function.name == "get_weather"
        assert all(f.id is None and f.function.name is None for f in fragments[1:])
        assert not any("<tool_call>" in (d.content or "") for d in deltas)
        message = final.choices[0].message
        assert final.choices[0].finish_reason == "tool_calls"
        assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}

    def test_tool_messages_in_history(self, oai):
        first = oai.chat.completions.create(model="m", messages=USER, tools=OPENAI_TOOLS, max_tokens=200)
        message = first.choices[0].message
        history = USER + [message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18 C"}]
        resp = oai.chat.completions.create(model="m", messages=history, tools=OPENAI_TOOLS, max_tokens=200)
        assert resp.choices[0].message.tool_calls

    def test_unknown_tool_call_id_is_400(self, oai):
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model="m", tools=OPENAI_TOOLS, max_tokens=20,
                                        messages=USER + [{"role": "tool", "tool_call_id": "nope", "content": "x"}])
        assert "tool_call_id" in str(err.value)

    def test_json_response_format_is_accepted(self, oai):
        resp = oai.chat.completions.create(model="m", messages=USER, max_tokens=5,
                                           response_format={"type": "json_object"})
        assert resp.choices[0].finish_reason in ("stop", "length")


# The fallback prompt format keeps earlier turns' tokens -------------------------------------------------


def test_next_turn_prompt_extends_this_turns_prompt_and_reply(tokenizer):
    """For the agent cache: turn N+1's prompt starts with turn N's prompt + the reply's tokens."""
    renderer = PromptRenderer(tokenizer)
    tools = [Tool("get_weather", "Current weather in a city", WEATHER_SCHEMA)]
    history = [ChatMessage("system", "You are terse."), ChatMessage("user", "Weather in Paris and Oslo?")]
    replies = [
        ("Let me look.", (ToolCall("toolu_1", "get_weather", {"city": "Paris"}),
                          ToolCall("toolu_2", "get_weather", {"city": "Oslo"}))),
        ("", (ToolCall("toolu_3", "get_weather", {"city": "Rome"}),)),
        ("Paris is sunny, Oslo is cold.", ()),
    ]
    for text, calls in replies:
        prompt = renderer.render(history, tools=tools)
        reply_ids = tokenizer.encode(text + call_text(calls), add_special_tokens=False)
        history.append(ChatMessage("assistant", text, tool_calls=calls))
        for call in calls:
            history.append(ChatMessage("tool", f"result for {call.arguments['city']}", tool_call_id=call.id))
        history.append(ChatMessage("user", "Thanks.")) if not calls else None
        following = renderer.render(history, tools=tools)
        assert following[: len(prompt) + len(reply_ids)] == prompt + reply_ids


async def test_a_model_repeating_its_call_is_stopped(make_client, tokenizer):
    """A small model under tool_choice any loops on the same call: the answer ends at the repeat,
    well before max_tokens, in both dialects, streamed or not."""
    engine = FakeEngine(tokenizer, reply=(CALL + "\n") * 8)
    client = await make_client(engine)
    body = {"model": "m", "max_tokens": 400, "messages": USER, "tools": CLAUDE_TOOLS, "tool_choice": {"type": "any"}}
    msg = await (await client.post("/v1/messages", json=body)).json()
    assert msg["stop_reason"] == "tool_use" and [b["type"] for b in msg["content"]] == ["tool_use"]
    per_call = len(tokenizer.encode(CALL + "\n", add_special_tokens=False))
    assert msg["usage"]["output_tokens"] < 3 * per_call  # not the 8 calls the model would write
    chat = {"model": "m", "max_tokens": 400, "messages": USER, "tools": OPENAI_TOOLS, "tool_choice": "required"}
    resp = await (await client.post("/v1/chat/completions", json={**chat, "stream": True})).text()
    chunks = [json.loads(line[6:]) for line in resp.splitlines() if line.startswith("data: {")]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert reasons == ["tool_calls"]
    assert sum(1 for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or () if tc.get("id")) == 1


# A template that takes tools (Hermes / Qwen 2.5 style, written for this test) ---------------------------

NATIVE_TEMPLATE = """{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}

# Tools
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content }}{% for call in message.tool_calls %}{% set tool_call = call.function %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_native_template_gets_the_tools_and_turn_two_reuses_turn_one(tokenizer):
    """With a template that takes tools, the template renders them (mlx-lm's json_tools parser is
    picked), and turn 2's prompt starts with turn 1's whole prompt and most of its reply."""
    import copy

    from semcache.engine.toolformat import format_for

    native = copy.copy(tokenizer)
    native.chat_template = NATIVE_TEMPLATE
    fmt = format_for(native)
    assert fmt.native and fmt.json_body
    renderer = PromptRenderer(native, fmt)
    tools = [Tool("get_weather", "Current weather in a city", WEATHER_SCHEMA)]
    history = [ChatMessage("user", "Weather in Paris?")]
    prompt = renderer.render(history, tools=tools)
    assert '"name": "get_weather"' in tokenizer.decode(prompt)
    call = ToolCall("call_1", "get_weather", {"city": "Paris"})
    reply = tokenizer.encode(call_text([call], fmt), add_special_tokens=False)
    history += [ChatMessage("assistant", "", (call,)), ChatMessage("tool", "18 C", tool_call_id="call_1")]
    following = renderer.render(history, tools=tools)
    shared = next((i for i, (a, b) in enumerate(zip(following, prompt + reply)) if a != b), len(prompt + reply))
    assert shared >= len(prompt) and shared >= 0.9 * len(prompt + reply), (shared, len(prompt), len(reply))


async def test_warm_with_tools_makes_the_first_tool_turn_a_hit(make_client):
    """POST /v1/agents/{id}/warm renders the tools like a request does, so the agent's first real
    turn with the same tools reuses the whole warmed prefix."""
    client = await make_client()
    system = "You are a weather assistant. " * 20
    warm = {"system": system, "messages": [], "tools": CLAUDE_TOOLS}
    r = await client.post("/v1/agents/weather-bot/warm", json=warm, headers={"anthropic-version": "2023-06-01"})
    assert r.status == 200, await r.text()
    warmed = (await r.json())["tokens"]
    body = {"model": "m", "max_tokens": 20, "system": system, "messages": USER, "tools": CLAUDE_TOOLS}
    r = await client.post("/v1/messages", json=body, headers={"X-Agent-ID": "weather-bot"})
    usage = (await r.json())["usage"]
    assert usage["cache_read_input_tokens"] >= warmed - 1


# Deep nesting in tool schemas, response formats, calls and their arguments ------------------------------

DEEP = "\x00deep\x00"  # placeholder for a value nested `depth` levels, spliced in as raw JSON text
TOOL_TURN = [USER[0], {"role": "assistant", "content": [{"type": "text", "text": "I'll check."},
                                                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                         "input": DEEP}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]}]
CALL_TURN = [USER[0], {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": DEEP}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]
NESTED = {  # name: (path, body, the field the 400 names)
    "anthropic tool_use input": ("/v1/messages", {"model": "m", "max_tokens": 8, "messages": TOOL_TURN,
                                                  "tools": CLAUDE_TOOLS}, "messages[1].content[1].input"),
    "anthropic input_schema": ("/v1/messages", {"model": "m", "max_tokens": 8, "messages": USER, "tools": [
        {"name": "deep", "input_schema": DEEP}]}, "tools[0].input_schema"),
    "openai arguments": ("/v1/chat/completions", {"model": "m", "messages": CALL_TURN, "tools": OPENAI_TOOLS},
                         "messages[1].tool_calls[0].function.arguments"),
    "openai parameters": ("/v1/chat/completions", {"model": "m", "messages": USER, "tools": [
        {"type": "function", "function": {"name": "deep", "parameters": DEEP}}]}, "tools[0].function.parameters"),
    "openai response_format": ("/v1/chat/completions", {"model": "m", "messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "r", "schema": DEEP}}}, "response_format.json_schema.schema"),
}


def nested(depth: int) -> str:
    """A valid JSON object schema nesting `depth` levels in all (each property's schema is two)."""
    pairs, odd = divmod(depth - 1, 2)
    inner = '{"type": "array", "items": {"type": "string"}}' if odd else '{"type": "string"}'
    return '{"type": "object", "properties": {"a": ' * pairs + inner + "}}" * pairs


@pytest.mark.parametrize("name, depth", [(name, depth) for name in NESTED for depth in (101, 900)]
                         + [("openai arguments", 20_000)])  # a string: not limited by the body's decoder
async def test_deep_nesting_in_tools_and_schemas_is_a_400_naming_the_field(make_client, name, depth):
    """Arguments nested thousands deep were a 500 (json.loads raised RecursionError); schemas and
    inputs nested deep enough broke the chat template or the grammar compiler further on. Past 100
    levels each is a 400 naming its field, in the route's dialect; 100 levels still work."""
    client = await make_client()
    path, body, field = NESTED[name]
    value = nested(depth)
    if name == "openai arguments":
        value = json.dumps(value)  # a string holding the JSON text
    raw = json.dumps(body).replace(json.dumps(DEEP), value).encode()
    r = await client.post(path, data=raw, headers={"content-type": "application/json"})
    error = (await r.json())["error"]
    assert r.status == 400, error
    assert f"{field} is nested more than 100 levels deep" in error["message"], error
    assert path == "/v1/messages" or error["param"] == field
    if depth == 101:  # the limit is the depth, not the size
        shallow = json.dumps(body).replace(json.dumps(DEEP), json.dumps(nested(100)) if name == "openai arguments"
                                           else nested(100)).encode()
        r = await client.post(path, data=shallow, headers={"content-type": "application/json"})
        assert r.status == 200, await r.text()


@pytest.mark.parametrize("schema, says", [
    ({"type": "object", "properties": {"a": {"enum": ["x" * 100] * 11_000}}}, "over the limit"),
    ({"enum": [f"value-{i}" for i in range(50_000)]}, "initial lexer configuration (grammar) too big"),
], ids=["grammar text", "compile fuel"])
async def test_a_response_format_past_a_grammar_limit_is_a_400_without_a_stall(make_client, schema, says):
    """A schema too costly to enforce is a 400 naming response_format, compiled off the event loop:
    /health/live keeps answering meanwhile."""
    import asyncio
    import time

    client = await make_client()
    body = {"model": "m", "messages": USER, "response_format": {"type": "json_schema",
                                                                "json_schema": {"name": "r", "schema": schema}}}
    request = asyncio.create_task(client.post("/v1/chat/completions", json=body))
    slowest = 0.0
    while not request.done():
        start = time.perf_counter()
        assert (await client.get("/health/live")).status == 200
        slowest = max(slowest, time.perf_counter() - start)
        await asyncio.sleep(0.01)
    r = await request
    error = (await r.json())["error"]
    assert r.status == 400 and error["param"] == "response_format.json_schema.schema" and says in error["message"]
    assert slowest < 0.5, f"the event loop stalled {slowest:.2f} s"
