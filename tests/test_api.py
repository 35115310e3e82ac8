"""HTTP API on a fake engine: both dialects' shapes, SSE framing, every error shape, health."""

import asyncio
import json
import re

import pytest

from semcache.http.appkeys import SERVICE
from semcache.text.chat import PromptRenderer
from semcache.text.grammar import Grammars
from tests.conftest import FAKE_REPLY, FakeEngine

ANTHROPIC = {"anthropic-version": "2023-06-01"}
MSG = {"model": "any-model", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
CHAT = {"model": "any-model", "messages": [{"role": "user", "content": "Hi"}]}


def sse_events(raw: str) -> list[tuple[str | None, str]]:
    """Parse an SSE body into (event name, data) pairs."""
    events = []
    for block in raw.strip().split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append((name, data))
    return events


def assert_anthropic_error(body: dict, etype: str, contains: str = ""):
    assert body["type"] == "error"
    assert body["error"]["type"] == etype
    assert contains in body["error"]["message"]


def assert_openai_error(body: dict, contains: str = ""):
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert contains in body["error"]["message"]


class TestAnthropicMessages:
    async def test_non_streaming_shape(self, make_client):
        """A message with msg_ id, the echoed model name, text content, stop reason and usage."""
        client = await make_client()
        r = await client.post("/v1/messages", json=MSG)
        assert r.status == 200
        assert r.headers["request-id"].startswith("req_")
        body = await r.json()
        assert body["id"].startswith("msg_")
        assert body["model"] == "any-model"
        assert body["content"] == [{"type": "text", "text": FAKE_REPLY}]
        assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
        usage = body["usage"]
        assert usage["input_tokens"] > 0 and usage["output_tokens"] == 11
        assert usage["cache_read_input_tokens"] == usage["cache_creation_input_tokens"] == 0

    async def test_streaming_event_sequence(self, make_client):
        """Every event is named; start, block start/deltas/stop, message_delta with usage, stop."""
        client = await make_client()
        r = await client.post("/v1/messages", json={**MSG, "stream": True})
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await r.text())
        names = [n for n, _ in events]
        assert all(n is not None for n in names)
        assert names[:3] == ["message_start", "content_block_start", "ping"]
        assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        datas = [json.loads(d) for _, d in events]
        assert all(d["type"] == n for n, d in zip(names, datas))
        start = datas[0]["message"]
        assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
        text = "".join(d["delta"]["text"] for d in datas if d["type"] == "content_block_delta")
        assert text == FAKE_REPLY
        delta = datas[-2]
        assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
        assert delta["usage"]["output_tokens"] == 11

    async def test_stop_sequence_reported(self, make_client):
        """stop_sequences end generation; the matched string is reported and not returned."""
        client = await make_client()
        body = await (await client.post("/v1/messages", json={**MSG, "stop_sequences": ["fox"]})).json()
        assert body["content"][0]["text"] == "The quick brown "
        assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "fox")

    async def test_max_tokens_enforced(self, make_client):
        """max_tokens caps the output and reports max_tokens."""
        client = await make_client()
        body = await (await client.post("/v1/messages", json={**MSG, "max_tokens": 2})).json()
        assert body["usage"]["output_tokens"] == 2 and body["stop_reason"] == "max_tokens"

    async def test_system_blocks_and_history_accepted(self, make_client):
        """system as text blocks, multi-turn history, unknown fields and query parameters are fine."""
        client = await make_client()
        req = {**MSG, "system": [{"type": "text", "text": "Be brief."}], "metadata": {"user_id": "u"},
               "some_future_field": 1, "temperature": 0.5, "top_k": 5, "top_p": 0.9,
               "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": [{"type": "text", "text": "c"}]}]}
        r = await client.post("/v1/messages?beta=true", json=req, headers={"anthropic-version": "2026-10-21"})
        assert r.status == 200

    async def test_system_role_in_messages(self, make_client):
        """System messages are accepted anywhere, even last (Claude Code sends environment notes and
        reminders mid-conversation), and rendered where they stand."""
        client = await make_client()
        first = {**MSG, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
        assert (await client.post("/v1/messages", json=first)).status == 200
        late = {**MSG, "messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
                                    {"role": "system", "content": "S"}, {"role": "user", "content": "V"},
                                    {"role": "system", "content": "last"}]}
        r = await client.post("/v1/messages", json=late)
        assert r.status == 200, await r.text()
        counted = await client.post("/v1/messages/count_tokens", json={k: v for k, v in late.items() if k != "max_tokens"})
        usage = (await r.json())["usage"]
        assert (await counted.json())["input_tokens"] == (usage["input_tokens"] + usage["cache_read_input_tokens"]
                                                          + usage["cache_creation_input_tokens"])

    async def test_prefill_with_trailing_whitespace_is_400(self, make_client):
        """A final assistant message ending in whitespace is refused, as the real API does."""
        client = await make_client()
        req = {**MSG, "messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A "}]}
        r = await client.post("/v1/messages", json=req)
        assert r.status == 400
        assert_anthropic_error(await r.json(), "invalid_request_error", "trailing whitespace")

    async def test_error_body_carries_request_id(self, make_client):
        """Anthropic error bodies carry the same request_id as the request-id header."""
        client = await make_client()
        r = await client.post("/v1/messages", json={"model": "m"})
        assert (await r.json())["request_id"] == r.headers["request-id"]

    async def test_count_tokens_equals_usage_input_sum(self, make_client):
        """count_tokens returns only input_tokens, equal to the three usage input counters' sum."""
        client = await make_client()
        req = {"model": "m", "system": "be nice", "messages": MSG["messages"]}
        counted = await (await client.post("/v1/messages/count_tokens", json=req)).json()
        usage = (await (await client.post("/v1/messages", json={**req, "max_tokens": 5})).json())["usage"]
        assert list(counted) == ["input_tokens"]
        assert counted["input_tokens"] == (
            usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
        )


    async def test_count_tokens_takes_a_queue_place_like_generation(self, make_client):
        """count_tokens tokenizes as much as a generation does: it holds a queue place meanwhile, so a
        full queue refuses it at once (529 with Retry-After) instead of tokenizing without bound."""
        client = await make_client(max_active=1, max_queue=1)
        scheduler = client.app[SERVICE].scheduler
        scheduler.reserve()
        scheduler.reserve()  # the queue's place and the free slot's, held by requests being prepared
        req = {"model": "m", "messages": MSG["messages"]}
        r = await client.post("/v1/messages/count_tokens", json=req, headers=ANTHROPIC)
        assert r.status == 529 and int(r.headers["Retry-After"]) >= 1
        assert_anthropic_error(await r.json(), "overloaded_error", "queue is full")
        scheduler.unreserve()
        r = await client.post("/v1/messages/count_tokens", json=req, headers=ANTHROPIC)
        assert r.status == 200 and (await r.json())["input_tokens"] > 0
        assert scheduler.waiting.num_reserved == 1  # its place was given back


class TestOpenAIChat:
    async def test_non_streaming_shape(self, make_client):
        """chatcmpl- id, one choice with the message, finish_reason stop, usage with cached_tokens."""
        client = await make_client()
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status == 200 and r.headers["x-request-id"]
        body = await r.json()
        assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
        choice = body["choices"][0]
        assert choice["message"]["content"] == FAKE_REPLY and choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] == "stop"
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert u["prompt_tokens_details"]["cached_tokens"] == 0

    async def test_streaming_chunks(self, make_client):
        """Role only in the first chunk, one finish_reason, a usage chunk with no choices, [DONE]."""
        client = await make_client()
        req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        events = sse_events(await (await client.post("/v1/chat/completions", json=req)).text())
        assert events[-1] == (None, "[DONE]")
        chunks = [json.loads(d) for _, d in events[:-1]]
        assert len({c["id"] for c in chunks}) == 1
        roles = [c["choices"][0]["delta"].get("role") for c in chunks if c["choices"]]
        assert roles[0] == "assistant" and not any(roles[1:])
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert [f for f in finishes if f] == ["stop"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 11
        assert all(c["usage"] is None for c in chunks[:-1])
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == FAKE_REPLY

    async def test_missing_max_tokens_uses_default(self, make_client):
        """Without max_tokens, default_max_tokens applies."""
        client = await make_client(default_max_tokens=3)
        body = await (await client.post("/v1/chat/completions", json=CHAT)).json()
        assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"

    async def test_max_completion_tokens_wins(self, make_client):
        """max_completion_tokens overrides the deprecated max_tokens."""
        client = await make_client()
        req = {**CHAT, "max_tokens": 50, "max_completion_tokens": 2}
        body = await (await client.post("/v1/chat/completions", json=req)).json()
        assert body["usage"]["completion_tokens"] == 2

    async def test_stop_string_and_list(self, make_client):
        """stop as a string or list ends generation; finish_reason is stop; stop text not returned."""
        client = await make_client()
        for stop in ("brown", ["zzz", "brown"]):
            body = await (await client.post("/v1/chat/completions", json={**CHAT, "stop": stop})).json()
            assert body["choices"][0]["message"]["content"] == "The quick "
            assert body["choices"][0]["finish_reason"] == "stop"

    async def test_n_choices(self, make_client):
        """n gives n indexed choices; usage counts the prompt once and every completion."""
        client = await make_client()
        one = await (await client.post("/v1/chat/completions", json=CHAT)).json()
        body = await (await client.post("/v1/chat/completions", json={**CHAT, "n": 3})).json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert all(c["message"]["content"] == FAKE_REPLY for c in body["choices"])
        assert body["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
        assert body["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]

    async def test_n_choices_streamed(self, make_client):
        """Streamed n: each index gets its role once, its text, and exactly one finish_reason."""
        client = await make_client()
        req = {**CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
        events = sse_events(await (await client.post("/v1/chat/completions", json=req)).text())
        chunks = [json.loads(d) for _, d in events[:-1]]
        for index in (0, 1):
            mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
            assert [c["delta"].get("role") for c in mine].count("assistant") == 1
            assert "".join(c["delta"].get("content", "") for c in mine) == FAKE_REPLY
            assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["stop"]
        assert chunks[-1]["usage"]["completion_tokens"] == 22

    async def test_n_choices_render_tokenize_and_compile_once(self, make_client, tokenizer, monkeypatch):
        """n=16 renders and tokenizes the prompt once and compiles its grammar once (it did both 16
        times); each choice still gets its own seed and its own grammar state."""
        calls = []
        render, compile_ = PromptRenderer.render, Grammars.compile
        monkeypatch.setattr(PromptRenderer, "render", lambda *a, **k: calls.append("render") or render(*a, **k))
        monkeypatch.setattr(Grammars, "compile", lambda *a, **k: calls.append("compile") or compile_(*a, **k))
        admitted = []

        class Recording(FakeEngine):
            async def step(self, admit, release, keep=()):
                admitted.extend(a.sampling for a in admit)
                return await super().step(admit, release, keep)

        client = await make_client(engine=Recording(tokenizer))
        req = {**CHAT, "n": 16, "seed": 7, "max_tokens": 4, "response_format": {"type": "json_object"}}
        r = await client.post("/v1/chat/completions", json=req)
        assert r.status == 200 and len((await r.json())["choices"]) == 16
        assert calls == ["render", "compile"]
        assert sorted(s.seed for s in admitted) == list(range(7, 23))
        assert len({id(s.constraint) for s in admitted}) == 16 and all(s.constraint for s in admitted)

    async def test_n_above_max_active_is_400(self, make_client):
        """More choices than can run at once is refused up front."""
        client = await make_client(max_active=2)
        r = await client.post("/v1/chat/completions", json={**CHAT, "n": 3})
        assert r.status == 400
        assert_openai_error(await r.json(), "max_active")

    async def test_n_choices_all_aborted_on_disconnect(self, make_client, tokenizer):
        """A client that leaves an n=3 request frees all three sequences."""
        engine = FakeEngine(tokenizer, reply="word " * 500, step_delay=0.01)
        client = await make_client(engine=engine)
        task = asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "n": 3, "max_tokens": 1000}))
        await asyncio.sleep(0.1)
        task.cancel()
        for _ in range(300):
            if len(engine.released) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(engine.released) == 3 and not engine.active

    async def test_n_out_of_range_is_400(self, make_client):
        """n must be between 1 and 16."""
        client = await make_client()
        r = await client.post("/v1/chat/completions", json={**CHAT, "n": 17})
        assert r.status == 400
        assert_openai_error(await r.json(), "$.n")

    async def test_stream_options_without_stream_is_400(self, make_client):
        """stream_options needs stream=true."""
        client = await make_client()
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream_options": {"include_usage": True}})
        assert r.status == 400
        assert_openai_error(await r.json(), "stream_options")


class TestErrors:
    @pytest.mark.parametrize("path,body,anthropic", [
        ("/v1/messages", {**MSG, "max_tokens": "lots"}, True),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "lots"}, False),
    ])
    async def test_wrong_type_names_the_field(self, make_client, path, body, anthropic):
        """A field of the wrong type is a 400 whose message has the JSON path."""
        client = await make_client()
        r = await client.post(path, json=body)
        assert r.status == 400
        data = await r.json()
        if anthropic:
            assert_anthropic_error(data, "invalid_request_error", "$.max_tokens")
        else:
            assert_openai_error(data, "$.max_tokens")
            assert data["error"]["param"] == "max_tokens"

    async def test_bad_streaming_request_fails_before_the_stream(self, make_client):
        """A malformed stream=true request is a plain 400, not an SSE error."""
        client = await make_client()
        r = await client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "stream": True, "messages": ["hi"]})
        assert r.status == 400 and r.headers["Content-Type"].startswith("application/json")
        assert_anthropic_error(await r.json(), "invalid_request_error", "$.messages[0]")

    @pytest.mark.parametrize("raw", [b"", b"{not json", b"\xff\xfe", b"[]", b'{"model": "m"}'])
    async def test_malformed_bodies(self, make_client, raw):
        """Empty, broken, non-UTF-8, non-object and incomplete bodies are 400s in dialect shape."""
        client = await make_client()
        r = await client.post("/v1/messages", data=raw, headers={"Content-Type": "application/json"})
        assert r.status == 400
        assert_anthropic_error(await r.json(), "invalid_request_error")
        r = await client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
        assert r.status == 400
        assert_openai_error(await r.json())

    async def test_unsupported_features_are_clear_400s(self, make_client):
        """Images and server tools are rejected as not supported yet, naming the field."""
        client = await make_client()
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
        req = {**MSG, "messages": [{"role": "user", "content": [image]}]}
        data = await (await client.post("/v1/messages", json=req)).json()
        assert_anthropic_error(data, "invalid_request_error", "not supported yet")
        tools = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]
        data = await (await client.post("/v1/messages", json={**MSG, "tools": tools})).json()
        assert_anthropic_error(data, "invalid_request_error", "tools.0: Input tag 'web_search_20250305' found")
        parts = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
        r = await client.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": parts}]})
        assert r.status == 400
        assert_openai_error(await r.json(), "not supported yet")

    async def test_404_and_405_in_both_dialects(self, make_client):
        """Unknown routes and wrong methods get JSON errors shaped by path and anthropic-version."""
        client = await make_client()
        r = await client.get("/v1/nothing")
        assert r.status == 404
        assert_openai_error(await r.json(), "not found")
        r = await client.get("/v1/nothing", headers=ANTHROPIC)
        assert_anthropic_error(await r.json(), "not_found_error")
        r = await client.get("/v1/messages")
        assert r.status == 405
        assert_anthropic_error(await r.json(), "invalid_request_error", "GET")

    async def test_413_is_json(self, make_client):
        """A body over max_body is 413 request_too_large in JSON."""
        client = await make_client(max_body=2000)
        req = {**MSG, "messages": [{"role": "user", "content": "x" * 5000}]}
        r = await client.post("/v1/messages", json=req)
        assert r.status == 413
        assert_anthropic_error(await r.json(), "request_too_large", "max_body")

    async def test_prompt_longer_than_context_states_both_numbers(self, make_client, tokenizer):
        """A prompt past the context window is a 400 in Anthropic's exact words (Claude Code matches
        the whole message): the prompt's tokens and the most the model accepts, its context - 1."""
        client = await make_client(engine=FakeEngine(tokenizer, context_length=40))
        req = {**MSG, "messages": [{"role": "user", "content": "word " * 60}]}
        r = await client.post("/v1/messages", json=req)
        data = await r.json()
        assert r.status == 400 and r.headers["x-should-retry"] == "false"
        assert re.fullmatch(r"prompt is too long: \d+ tokens > 39 maximum", data["error"]["message"])
        counted = await (await client.post("/v1/messages/count_tokens", json=req)).json()
        assert data["error"]["message"] == f"prompt is too long: {counted['input_tokens']} tokens > 39 maximum"

    async def test_generation_stops_at_the_context(self, make_client, tokenizer):
        """prompt + max_tokens past the context is not refused: generation stops when the context is
        full, with model_context_window_exceeded (OpenAI: length)."""
        client = await make_client(engine=FakeEngine(tokenizer, context_length=36))
        body = await (await client.post("/v1/messages", json={**MSG, "max_tokens": 32000})).json()
        assert body["stop_reason"] == "model_context_window_exceeded"
        assert body["usage"]["input_tokens"] + body["usage"]["output_tokens"] == 36
        chat = await (await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 32000})).json()
        assert chat["choices"][0]["finish_reason"] == "length"
        assert chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"] == 36

    async def test_request_beyond_kv_budget_is_400_at_once(self, make_client):
        """A request that could never fit kv_budget fails now with 400, not after a queue wait."""
        client = await make_client(kv_budget=10_000)
        r = await client.post("/v1/messages", json={**MSG, "max_tokens": 100})
        assert r.status == 400
        assert_anthropic_error(await r.json(), "invalid_request_error", "kv_budget")

    @pytest.mark.parametrize("value", ["high", "12", "-1"])
    async def test_bad_priority_header(self, make_client, value):
        """X-Priority must be an integer in range."""
        client = await make_client()
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Priority": value})
        assert r.status == 400
        assert_openai_error(await r.json(), "priority")

    async def test_auth_with_keys(self, make_client):
        """With api_keys, both header styles work, a missing or wrong key is 401, /health is open."""
        client = await make_client(api_keys=["k1"])
        assert (await client.post("/v1/messages", json=MSG, headers={"x-api-key": "k1"})).status == 200
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k1"})
        assert r.status == 200
        r = await client.post("/v1/messages", json=MSG, headers={"x-api-key": "nope"})
        assert r.status == 401
        assert_anthropic_error(await r.json(), "authentication_error")
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "invalid_api_key"
        assert (await client.get("/health/ready")).status == 200

    async def test_mid_stream_failure_ends_with_error_event(self, make_client, tokenizer):
        """An engine failure after the 200 ends an Anthropic stream with a named error event."""
        engine = FakeEngine(tokenizer, step_delay=0.01)
        client = await make_client(engine=engine)
        r = await client.post("/v1/messages", json={**MSG, "stream": True})
        assert r.status == 200
        await r.content.readuntil(b"event: content_block_delta")
        engine.fail_next_step = True
        events = sse_events((b"event: content_block_delta" + await r.content.read()).decode())
        assert events[-1][0] == "error"
        assert json.loads(events[-1][1])["error"]["type"] == "api_error"
        assert "message_stop" not in [n for n, _ in events]

    async def test_mid_stream_failure_openai(self, make_client, tokenizer):
        """An OpenAI stream that fails mid-way ends with an error object and no [DONE]."""
        engine = FakeEngine(tokenizer, step_delay=0.01)
        client = await make_client(engine=engine)
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        await r.content.readuntil(b"\n\n")
        engine.fail_next_step = True
        events = sse_events((await r.content.read()).decode())
        assert "error" in json.loads(events[-1][1])
        assert (None, "[DONE]") not in events


    async def test_a_prompt_far_past_the_context_is_refused_before_it_is_tokenized(self, make_client, tokenizer,
                                                                                   monkeypatch):
        """A body of megabytes was tokenized (seconds of a worker thread) before the context check.
        Its length alone now shows it cannot fit (no token covers more bytes than the longest in the
        vocabulary): the same 400, in Claude Code's words, without tokenizing; count_tokens too."""
        encoded = []
        encode = type(tokenizer).encode
        monkeypatch.setattr(type(tokenizer), "encode", lambda self, text, **k: encoded.append(len(text))
                            or encode(self, text, **k))
        client = await make_client()  # context 8,192 tokens
        huge = [{"role": "user", "content": "word " * 400_000}]  # 2 MB: ~400,000 tokens
        r = await client.post("/v1/messages", json={**MSG, "messages": huge}, headers=ANTHROPIC)
        message = (await r.json())["error"]["message"]
        assert r.status == 400 and re.fullmatch(r"prompt is too long: \d+ tokens > 8191 maximum", message)
        assert int(message.split()[4]) >= 8192
        r = await client.post("/v1/chat/completions", json={**CHAT, "messages": huge, "n": 4})
        assert r.status == 400 and "prompt is too long" in (await r.json())["error"]["message"]
        r = await client.post("/v1/messages/count_tokens", json={"model": "m", "messages": huge}, headers=ANTHROPIC)
        assert r.status == 400 and "prompt is too long" in (await r.json())["error"]["message"]
        assert max(encoded, default=0) < 1000  # nothing big was tokenized
        r = await client.post("/v1/messages", json=MSG, headers=ANTHROPIC)
        assert r.status == 200  # a prompt that fits is tokenized as before

    @pytest.mark.parametrize("path, field", [("/v1/messages", "stop_sequences"), ("/v1/chat/completions", "stop")])
    async def test_stop_strings_are_capped_in_number_and_length(self, make_client, path, field):
        """Every token is matched against every stop string on the event loop (1,000,000 of them cost
        16.7 ms a token): at most 64 strings of 8,192 characters in all, in both dialects; more is a
        400 naming the field, and 64 still work (OpenAI's dialect took only 4)."""
        client = await make_client()
        base = MSG if path == "/v1/messages" else CHAT
        headers = ANTHROPIC if path == "/v1/messages" else {}
        many = [f"never-{i}-" + "x" * 100 for i in range(63)] + ["brown"]
        r = await client.post(path, json={**base, field: many}, headers=headers)
        body = await r.json()
        assert r.status == 200, body
        text = body["content"][0]["text"] if path == "/v1/messages" else body["choices"][0]["message"]["content"]
        assert text == "The quick "
        for stops, says in ((many + ["one more"], "at most 64 stop sequences"),
                            (["x" * 8193], "at most 8192 characters"), ([f"s{i}" for i in range(10**6)], "got 1000000")):
            r = await client.post(path, json={**base, field: stops}, headers=headers)
            error = (await r.json())["error"]
            assert r.status == 400 and error["message"].startswith(field) and says in error["message"], error
            assert path == "/v1/messages" or error["param"] == field


class TestCapacity:
    async def test_full_queue_is_529_or_503_with_retry_after(self, make_client, tokenizer):
        """A full queue refuses at once: Anthropic 529 overloaded_error, OpenAI 503, both with Retry-After."""
        engine = FakeEngine(tokenizer, step_delay=0.05)
        client = await make_client(engine=engine, max_active=1, max_queue=1)
        running = asyncio.create_task(client.post("/v1/messages", json={**MSG, "max_tokens": 20}))
        await asyncio.sleep(0.1)
        queued = asyncio.create_task(client.post("/v1/messages", json=MSG))
        await asyncio.sleep(0.05)
        r = await client.post("/v1/messages", json=MSG)
        assert r.status == 529 and int(r.headers["Retry-After"]) >= 1
        assert_anthropic_error(await r.json(), "overloaded_error", "queue is full")
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        assert (await client.get("/health/ready")).status == 503
        assert (await running).status == 200 and (await queued).status == 200

    async def test_64_concurrent_with_default_limits_all_succeed(self, make_client, tokenizer):
        """64 concurrent requests with default limits: every one 200, in both dialects."""
        client = await make_client(engine=FakeEngine(tokenizer, step_delay=0.002))
        reqs = [client.post("/v1/messages", json=MSG) if i % 2 else client.post("/v1/chat/completions", json=CHAT)
                for i in range(64)]
        responses = await asyncio.gather(*reqs)
        assert [r.status for r in responses] == [200] * 64

    async def test_loading_model_refuses_and_health_says_starting(self, aiohttp_client, tokenizer, tmp_path):
        """While the model loads: startup/ready 503, live 200, API requests 529/503 with Retry-After."""
        from semcache.http.app import make_app
        from semcache.ops.config import Config

        client = await aiohttp_client(make_app(Config(cache_dir=str(tmp_path)), engine=FakeEngine(tokenizer, load_delay=30)))
        assert (await client.get("/health/live")).status == 200
        r = await client.get("/health/startup")
        assert r.status == 503 and (await r.json())["status"] == "starting"
        assert (await client.get("/health/ready")).status == 503
        r = await client.post("/v1/messages", json=MSG)
        assert r.status == 529 and "Retry-After" in r.headers
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status == 503 and "Retry-After" in r.headers

    async def test_health_bodies(self, make_client):
        """Ready and startup are 200 with queue depth and active count once loaded."""
        client = await make_client()
        for path in ("/health/live", "/health/startup", "/health/ready"):
            r = await client.get(path)
            body = await r.json()
            assert r.status == 200 and body["status"] == "ok"
            assert body["queue_depth"] == 0 and body["active"] == 0

    async def test_client_disconnect_aborts_the_sequence(self, make_client, tokenizer):
        """Closing a stream mid-way releases its sequence in the engine."""
        engine = FakeEngine(tokenizer, reply="word " * 500, step_delay=0.01)
        client = await make_client(engine=engine)
        r = await client.post("/v1/messages", json={**MSG, "max_tokens": 1000, "stream": True})
        await r.content.readuntil(b"content_block_delta")
        r.close()
        for _ in range(200):
            if engine.released:
                break
            await asyncio.sleep(0.01)
        assert engine.released and not engine.active

    async def test_non_streaming_disconnect_aborts_too(self, make_client, tokenizer):
        """A non-streaming client that goes away frees its slot."""
        engine = FakeEngine(tokenizer, reply="word " * 500, step_delay=0.01)
        client = await make_client(engine=engine)
        task = asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1000}))
        await asyncio.sleep(0.1)
        task.cancel()
        for _ in range(300):
            if engine.released:
                break
            await asyncio.sleep(0.01)
        assert engine.released and not engine.active


class TestModels:
    async def test_models_shape_follows_anthropic_version(self, make_client):
        """/v1/models: OpenAI list without anthropic-version, Anthropic page with it."""
        client = await make_client()
        openai_list = await (await client.get("/v1/models")).json()
        assert openai_list["object"] == "list" and openai_list["data"][0]["id"] == "fake-model"
        page = await (await client.get("/v1/models", headers=ANTHROPIC)).json()
        assert page["data"][0]["type"] == "model" and page["has_more"] is False
        assert page["first_id"] == "fake-model" and page["data"][0]["lifecycle"] == "active"

    async def test_model_by_id(self, make_client):
        """Any id the generation routes accept is found, under that id, with the real context window
        (Claude Code looks up `--model local` and would otherwise assume a 1M-token window)."""
        client = await make_client()
        assert (await (await client.get("/v1/models/fake-model")).json())["id"] == "fake-model"
        r = await client.get("/v1/models/local", headers=ANTHROPIC)
        assert r.status == 200
        model = await r.json()
        assert model["id"] == "local" and model["type"] == "model" and model["max_input_tokens"] == 8192
