"""What real agent clients (Claude Code first) send and expect of a local Anthropic-compatible server:
probes, model discovery, the exact overflow error, retry hints, keep-alive pings, the billing block,
the client's own session and request-class headers, and unknown fields and beta flags."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from perf.agents_cc.recorder import parse_answer
from perf.common import sse_event
from semcache.http import sse
from semcache.http.appkeys import SERVICE
from tests.conftest import FakeEngine, settled

ANTHROPIC = {"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"}
SYSTEM = [{"type": "text", "text": "You are a coding agent. " * 20, "cache_control": {"type": "ephemeral"}}]


def billing(suffix: str) -> dict:
    return {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.328.{suffix}; cc_entrypoint=sdk-cli;"}


def request(*turns: str, system=SYSTEM, **extra) -> dict:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"model": "local", "max_tokens": 16, "system": system, "messages": messages, **extra}


async def post(client, body: dict, **headers) -> tuple[int, dict, dict]:
    r = await client.post("/v1/messages?beta=true", json=body, headers={**ANTHROPIC, **headers})
    return r.status, await r.json(), dict(r.headers)


class TestGatewayContract:
    async def test_start_up_probes_answer_without_a_key(self, make_client):
        """HEAD / and HEAD /api/hello are 200 even when keys are required (they reveal nothing)."""
        client = await make_client(api_keys=["k1"])
        for path in ("/", "/api/hello"):
            assert (await client.head(path)).status == 200
        assert (await client.get("/v1/models")).status == 401

    async def test_unknown_fields_and_beta_flags_are_accepted(self, make_client):
        """?beta=true, any anthropic-beta list, and Claude Code's body fields (thinking,
        context_management, output_config, metadata, service_tier, container; tool fields strict,
        defer_loading, input_examples) are a 200."""
        client = await make_client()
        tool = {"name": "Read", "description": "Read a file", "strict": True, "defer_loading": False,
                "input_examples": [{"path": "a"}],
                "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}
        body = request("Hi", tools=[tool], thinking={"type": "adaptive"},
                       context_management={"edits": [{"type": "clear_thinking_20251015"}]},
                       output_config={"effort": "high"}, metadata={"user_id": '{"session_id": "s"}'},
                       service_tier="auto", container=None)
        status, data, _ = await post(client, body, **{"anthropic-beta": "a-1,b-2,context-management-2025-06-27"})
        assert status == 200, data

    async def test_thinking_blocks_in_history_are_accepted(self, make_client):
        """Earlier turns' thinking and redacted_thinking blocks, whatever their signature, are fine."""
        client = await make_client()
        body = request("Hi")
        body["messages"] += [
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "bogus"},
                                              {"type": "redacted_thinking", "data": "xyz"},
                                              {"type": "text", "text": "Hello"}]},
            {"role": "user", "content": "Again"}]
        status, data, _ = await post(client, body)
        assert status == 200, data

    async def test_max_tokens_zero_ends_without_output(self, make_client):
        client = await make_client()
        status, data, _ = await post(client, request("Hi", max_tokens=0))
        assert status == 200 and data["usage"]["output_tokens"] == 0 and data["stop_reason"] == "max_tokens"

    async def test_operator_ceiling_clamps_max_tokens(self, make_client, tokenizer):
        """max_output_tokens lowers what a client asks for (32,000 from Claude Code): max_tokens."""
        client = await make_client(engine=FakeEngine(tokenizer, reply="word " * 40), max_output_tokens=5)
        status, data, _ = await post(client, request("Hi", max_tokens=32000))
        assert status == 200 and data["usage"]["output_tokens"] == 5 and data["stop_reason"] == "max_tokens"

    async def test_retry_hints(self, make_client, tokenizer):
        """x-should-retry is false on a 400 and true on a capacity refusal, whose retry-after is an
        integer number of seconds."""
        client = await make_client()
        bad = await client.post("/v1/messages", json={"model": "m"}, headers=ANTHROPIC)
        assert bad.status == 400 and bad.headers["x-should-retry"] == "false"
        slow = FakeEngine(tokenizer, step_delay=0.05, reply="word " * 50)
        client = await make_client(engine=slow, max_active=1, max_queue=1, cache_enabled=False)
        bodies = [request(f"Hi {i}") for i in range(6)]
        responses = await asyncio.gather(*(client.post("/v1/messages", json=b, headers=ANTHROPIC) for b in bodies))
        refused = [r for r in responses if r.status == 529]
        assert refused, [r.status for r in responses]
        for r in refused:
            assert r.headers["x-should-retry"] == "true" and r.headers["retry-after"].isdigit()

    async def test_count_tokens_is_what_messages_renders(self, make_client):
        """count_tokens counts the same prompt /v1/messages prefills: tools, mid-conversation
        system messages, thinking blocks in history, and no billing block."""
        client = await make_client()
        tool = {"name": "Read", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}
        body = request("Hi", "Hello", system=[billing("f86"), *SYSTEM], tools=[tool])
        body["messages"] += [{"role": "system", "content": "<env>cwd=/tmp</env>"},
                             {"role": "user", "content": [{"type": "text", "text": "Read a"}]}]
        status, data, _ = await post(client, body)
        counted = await client.post("/v1/messages/count_tokens?beta=true", json={k: v for k, v in body.items()
                                                                                if k != "max_tokens"},
                                    headers=ANTHROPIC)
        usage = data["usage"]
        total = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
        assert status == 200 and (await counted.json())["input_tokens"] == total


class TestKeepAlive:
    async def test_a_slow_stream_gets_pings_between_events(self, make_client, tokenizer, monkeypatch):
        """With nothing to send for the keep-alive interval (a slow prefill or step), the stream
        carries `ping` events, each a whole SSE event, and still ends with message_stop."""
        monkeypatch.setattr(sse, "KEEPALIVE_SECONDS", 0.05)
        client = await make_client(engine=FakeEngine(tokenizer, step_delay=0.2, reply="one two"))
        r = await client.post("/v1/messages", json=request("Hi", stream=True), headers=ANTHROPIC)
        text = await r.text()
        events = [e for e in text.split("\n\n") if e]
        assert all(e.startswith("event: ") and "\ndata: " in e for e in events)
        names = [e.split("\n", 1)[0][len("event: "):] for e in events]
        assert names.count("ping") >= 3 and names[0] == "message_start" and names[-1] == "message_stop"


class TestCacheKeys:
    async def test_the_billing_block_is_not_part_of_the_prompt(self, make_client):
        """Two sessions whose billing lines differ render the same prompt, so the second reads
        the first's whole system prompt from cache; the line counts in no usage field."""
        client = await make_client()
        first = request("Hi", system=[billing("aaa"), *SYSTEM])
        _, one, _ = await post(client, first, **{"X-Agent-ID": "session-1"})
        plain = await post(client, request("Hi"), **{"X-Agent-ID": "session-0"})
        second = request("Hi", system=[billing("bbb; cc_prev_msg=123"), *SYSTEM])
        _, two, _ = await post(client, second, **{"X-Agent-ID": "session-2"})

        def prompt(u):
            return u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"]

        assert prompt(one["usage"]) == prompt(two["usage"]) == prompt(plain[1]["usage"])
        assert two["usage"]["cache_read_input_tokens"] >= prompt(two["usage"]) - 8  # all but the last turn


class TestClientHeaders:
    async def test_claude_code_session_header_names_the_agent(self, make_client):
        """x-claude-code-session-id names the agent when no X-Agent-ID is sent; a subagent's
        x-claude-code-agent-id wins over it; X-Agent-ID wins over both."""
        client = await make_client()
        cases = [({"x-claude-code-session-id": "0b6f-sess"}, "0b6f-sess"),
                 ({"x-claude-code-session-id": "0b6f-sess", "x-claude-code-agent-id": "sub-1"}, "sub-1"),
                 ({"x-claude-code-session-id": "0b6f-sess", "X-Agent-ID": "mine"}, "mine")]
        for i, (headers, agent) in enumerate(cases):
            status, _, _ = await post(client, request(f"Hi {i}"), **headers)
            assert status == 200
            listed = await (await client.get(f"/v1/agents/{agent}", headers=ANTHROPIC)).json()
            assert listed["agent_id"] == agent

    async def test_an_invalid_client_header_is_ignored(self, make_client):
        """A Claude Code header that is not a valid agent id is ignored (anonymous), never a 400."""
        client = await make_client()
        status, _, _ = await post(client, request("Hi"), **{"x-claude-code-session-id": "bad id/with space"})
        assert status == 200
        agents = await (await client.get("/v1/agents", headers=ANTHROPIC)).json()
        assert all(not a["agent_id"].startswith("bad") for a in agents["data"])

    async def test_background_requests_queue_later_and_are_evicted_first(self, make_client):
        """x-claude-code-request-class auxiliary/compaction: priority 7 (after the default 5), and
        its cache entry is marked background (evicted before main agents' entries)."""
        client = await make_client()
        service = client.app[SERVICE]
        seen = []
        submit = service.scheduler.submit

        def spy(seq):
            seen.append(seq)
            submit(seq)

        service.scheduler.submit = spy
        await post(client, request("Title this"), **{"x-claude-code-request-class": "auxiliary",
                                                     "X-Agent-ID": "s1"})
        await post(client, request("Main turn"), **{"X-Agent-ID": "s1"})
        assert [s.priority for s in seen] == [7, 5] and [s.background for s in seen] == [True, False]
        await service.cache.settle()
        assert sorted(e.background for e in service.agents("default", "s1")) == [False, True]

    async def test_compaction_replaces_the_old_branch(self, make_client):
        """The first request after x-claude-code-context-compacted stores an entry that replaces all
        of the agent's older ones (the old branch can never be extended again)."""
        client = await make_client()
        service = client.app[SERVICE]
        await post(client, request("A long first conversation"), **{"X-Agent-ID": "s2"})
        await post(client, request("Another branch entirely"), **{"X-Agent-ID": "s2"})
        assert len(service.agents("default", "s2")) == 2
        status, _, _ = await post(client, request("Summary so far"), **{"X-Agent-ID": "s2",
                                                                         "x-claude-code-context-compacted": "true"})
        assert status == 200
        assert len(service.agents("default", "s2")) == 1


@pytest.mark.parametrize("kind", ["web_search_20250305", "bash_20250124"])
async def test_server_tools_are_named_the_way_claude_code_parses(make_client, kind):
    """A versioned server tool is a 400 worded as Anthropic words it, so the client drops it."""
    client = await make_client()
    tool = {"type": kind, "name": "x"}
    status, data, headers = await post(client, request("Hi", tools=[{"name": "ok", "input_schema": {"type": "object"}},
                                                                     tool]))
    assert status == 400 and headers["x-should-retry"] == "false"
    assert data["error"]["message"].startswith(f"tools.1: Input tag '{kind}' found using 'type'")


class TestCanonicalReplies:
    REPLY = "Paris is the capital of France."

    async def two_turns(self, client, service, tokenizer):
        first = {"model": "m", "max_tokens": 64, "system": SYSTEM,  # past cache_min_prefix (64 tokens)
                 "messages": [{"role": "user", "content": "Capital of France?"}]}
        _, one, _ = await post(client, first, **{"X-Agent-ID": "canon"})
        reply = one["content"][0]["text"]
        await settled(service)
        second = {**first, "messages": [*first["messages"], {"role": "assistant", "content": reply},
                                        {"role": "user", "content": "And of Spain?"}]}
        _, two, _ = await post(client, second, **{"X-Agent-ID": "canon"})
        usage = two["usage"]
        new_turn = len(tokenizer.encode("<|im_start|>user\nAnd of Spain?<|im_end|>\n<|im_start|>assistant\n",
                                        add_special_tokens=False))
        return reply, usage["input_tokens"] + usage["cache_creation_input_tokens"], new_turn

    async def test_a_reply_generated_in_other_tokens_is_read_back_whole(self, make_client, tokenizer):
        """A reply sampled as single characters re-tokenizes differently next turn; its canonical
        form is prefilled in the background, so the next turn computes only its new user message."""
        engine = FakeEngine(tokenizer)
        engine.reply_ids = [tokenizer.encode(ch, add_special_tokens=False)[0] for ch in self.REPLY] + [2]
        client = await make_client(engine=engine)
        service = client.app[SERVICE]
        reply, uncached, new_turn = await self.two_turns(client, service, tokenizer)
        assert reply == self.REPLY and service.turns.num_canonical == 1
        metrics = service.scheduler.metrics
        assert metrics.replies_retokenized._value.get() == 1 and metrics.replies_checked._value.get() >= 1
        assert uncached <= new_turn, (uncached, new_turn)
        assert not engine.prefix_errors

    async def test_an_openai_streamed_reply_is_read_back_whole(self, make_client, tokenizer):
        """The same for a streamed OpenAI answer: its reply, gathered from the chunks, is checked
        and prefilled in canonical form once the stream ends."""
        engine = FakeEngine(tokenizer)
        engine.reply_ids = [tokenizer.encode(ch, add_special_tokens=False)[0] for ch in self.REPLY] + [2]
        client = await make_client(engine=engine)
        service = client.app[SERVICE]
        messages = [{"role": "system", "content": SYSTEM[0]["text"]}, {"role": "user", "content": "Capital of France?"}]

        async def turn(messages: list) -> tuple[str, dict]:
            r = await client.post("/v1/chat/completions", headers={"X-Agent-ID": "canon-oai"}, json={
                "model": "m", "max_tokens": 64, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}})
            chunks = [c for c in map(sse_event, (await r.read()).split(b"\n")) if c]
            return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]), chunks[-1]["usage"]

        reply, _ = await turn(messages)
        await settled(service)
        _, usage = await turn([*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": "And of Spain?"}])
        new_turn = len(tokenizer.encode("<|im_start|>user\nAnd of Spain?<|im_end|>\n<|im_start|>assistant\n",
                                        add_special_tokens=False))
        assert reply == self.REPLY and service.turns.num_canonical == 1
        assert usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"] <= new_turn, usage

    async def test_a_canonical_reply_needs_no_extra_prefill(self, make_client, tokenizer):
        """When the generated tokens are what the next turn renders, nothing extra runs."""
        engine = FakeEngine(tokenizer, reply=self.REPLY)
        client = await make_client(engine=engine)
        service = client.app[SERVICE]
        _, uncached, new_turn = await self.two_turns(client, service, tokenizer)
        # the reply's closing <|im_end|> was sampled, not fed, and "\n" follows it: 2 more tokens
        assert service.turns.num_canonical == 0 and uncached <= new_turn + 2


class TestRecordedTraffic:
    """Claude Code's own requests, recorded by `python -m perf agents-cc --record tests/data` and
    scrubbed to their structure (filler of equal token length, fake ids), replayed in order on the
    fake engine: each gets the status the real daemon gave it, and each turn after the first reads
    the previous turn's prompt back from cache."""

    @pytest.fixture
    def traffic(self):
        return json.loads(RECORDED.read_text())

    async def test_every_recorded_request_gets_its_status(self, make_client, traffic):
        client = await make_client()
        previous: dict[str, int] = {}
        for i, recorded in enumerate(traffic):
            headers = {k: v for k, v in recorded["headers"].items() if k != "user-agent"}
            r = await client.post(recorded["path"], json=recorded["body"], headers=headers)
            data = await r.json() if not recorded["body"].get("stream") or r.status != 200 else \
                parse_answer(await r.read())["usage"]
            assert r.status == recorded["status"], (i, recorded["label"], data)
            if r.status != 200:
                assert _shape(data["error"]["message"]) == recorded["error"], (i, data)
                continue
            session = recorded["headers"].get("x-claude-code-session-id")
            compacted = recorded["label"].endswith("after compaction") and not traffic[i - 1]["label"].endswith(
                "after compaction")  # a summary replaced the history: only the system and tools are shared
            if compacted:
                assert data["cache_read_input_tokens"] >= shared_prefix(traffic, i) * 0.9, (i, data)
            elif session in previous:  # a later request of the session: the earlier prompt is cached
                assert data["cache_read_input_tokens"] >= previous[session] * 0.95, (i, recorded["label"], data)
            previous[session] = data["input_tokens"] + data["cache_read_input_tokens"] + data[
                "cache_creation_input_tokens"]


RECORDED = Path(__file__).parent / "data" / "claude-code-2.1.328.json"


def shared_prefix(traffic: list[dict], i: int) -> int:
    """Tokens request i's prompt shares with its session's first request (as the daemon renders them)."""
    from perf.agents_cc.render import render_ids
    from semcache.cache.entry import common_prefix

    session = traffic[i]["headers"]["x-claude-code-session-id"]
    first = next(r for r in traffic if r["headers"].get("x-claude-code-session-id") == session)
    return common_prefix(render_ids(first["body"]), render_ids(traffic[i]["body"]))


def _shape(message: str) -> str:
    return re.sub(r"\d+", "N", message)
