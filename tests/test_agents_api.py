"""The agent cache over HTTP on a fake engine: identity, usage counters, tenants, /v1/agents, metrics.

The fake engine's "KV" is the token ids themselves and it records every admission whose cached
prefix is not the start of its own prompt (`prefix_errors`): a wrong hit fails these tests.
"""

import asyncio
import json

import pytest

from semcache.http.appkeys import SERVICE
from tests.conftest import FakeEngine, settled, until

ANTHROPIC = {"anthropic-version": "2023-06-01"}
SYSTEM = "You are a careful assistant for agents. " * 8  # ~70 tokens: above the test min_prefix
CACHE = {"cache_min_prefix": 16}


def convo(*turns: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


def msg(messages, **extra) -> dict:
    return {"model": "m", "max_tokens": 32, "system": SYSTEM, "messages": messages, **extra}


async def post_msg(client, body, agent=None, key=None, **headers):
    headers = {**ANTHROPIC, **headers}
    if agent:
        headers["X-Agent-ID"] = agent
    if key:
        headers["x-api-key"] = key
    r = await client.post("/v1/messages", json=body, headers=headers)
    return r.status, await r.json()


async def prompt_tokens(client, body, key=None) -> int:
    headers = {**ANTHROPIC, **({"x-api-key": key} if key else {})}
    body = {k: v for k, v in body.items() if k in ("model", "system", "messages")}
    r = await client.post("/v1/messages/count_tokens", json=body, headers=headers)
    return (await r.json())["input_tokens"]


def assert_sums(usage: dict, total: int) -> None:
    parts = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
    assert parts == total, usage


async def two_turns(client, agent="agent-1", key=None):
    """Turn 1, then turn 2 repeating turn 1 and its reply; returns both usages and the turn-2 body."""
    status, first = await post_msg(client, msg(convo("What is 2+2?")), agent, key)
    assert status == 200
    second_body = msg(convo("What is 2+2?", first["content"][0]["text"], "And 3+3?"))
    status, second = await post_msg(client, second_body, agent, key)
    assert status == 200
    return first["usage"], second["usage"], second_body


class TestTurns:
    async def test_second_turn_reads_the_first_from_cache(self, make_client, tokenizer):
        """Turn 2 reuses turn 1's prompt and reply: cache_read > 0, and the three counters sum to the prompt."""
        engine = FakeEngine(tokenizer)
        client = await make_client(engine, **CACHE)
        first, second, body = await two_turns(client)
        assert first["cache_read_input_tokens"] == 0
        total = await prompt_tokens(client, body)
        assert second["cache_read_input_tokens"] > total // 2
        assert_sums(second, total)
        assert engine.prefix_errors == []

    async def test_stream_reports_the_same_usage(self, make_client):
        """message_start and message_delta carry the same cache counters as a non-streamed answer."""
        client = await make_client(**CACHE)
        _, _, body = await two_turns(client, "agent-s")
        _, plain = await post_msg(client, body, "agent-t")  # another agent: found through the trie
        r = await client.post("/v1/messages", json={**body, "stream": True}, headers={**ANTHROPIC, "X-Agent-ID": "agent-t"})
        events = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: ")]
        start = events[0]["message"]["usage"]
        assert start["cache_read_input_tokens"] == plain["usage"]["cache_read_input_tokens"] > 0
        assert_sums(start, await prompt_tokens(client, body))

    async def test_x_session_id_is_an_alias(self, make_client):
        """X-Session-ID names the agent just like X-Agent-ID."""
        client = await make_client(**CACHE)
        status, _ = await post_msg(client, msg(convo("Hello")), **{"X-Session-ID": "sess-9"})
        assert status == 200
        r = await client.get("/v1/agents/sess-9")
        assert r.status == 200 and (await r.json())["agent_id"] == "sess-9"

    async def test_openai_cached_tokens_stream_and_not(self, make_client, tmp_path):
        """usage.prompt_tokens_details.cached_tokens: same number streamed (include_usage) and not."""
        first = {"model": "m", "max_tokens": 16, "messages": [{"role": "system", "content": SYSTEM},
                                                               {"role": "user", "content": "Hi"}]}
        headers = {"X-Agent-ID": "oa"}
        seen = []
        for stream in (False, True):  # the same two turns on two fresh servers
            client = await make_client(cache_dir=str(tmp_path / f"c{stream}"), **CACHE)
            r = await client.post("/v1/chat/completions", json=first, headers=headers)
            reply = (await r.json())["choices"][0]["message"]["content"]
            second = {**first, "messages": first["messages"] + [{"role": "assistant", "content": reply},
                                                                 {"role": "user", "content": "More"}]}
            if stream:
                second.update(stream=True, stream_options={"include_usage": True})
            r = await client.post("/v1/chat/completions", json=second, headers=headers)
            if stream:
                chunks = [json.loads(line[6:]) for line in (await r.text()).splitlines()
                          if line.startswith("data: {")]
                usage = chunks[-1]["usage"]
            else:
                usage = (await r.json())["usage"]
            seen.append(usage["prompt_tokens_details"]["cached_tokens"])
            assert 0 < seen[-1] < usage["prompt_tokens"]
        assert seen[0] == seen[1]

    async def test_cache_control_counts_creation_tokens(self, make_client):
        """Marked blocks: not-reused tokens up to the last cache_control are cache_creation, then read."""
        client = await make_client(**CACHE)
        system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
        body = {"model": "m", "max_tokens": 8, "system": system, "messages": convo("Question one?")}
        _, first = await post_msg(client, body, "cc")
        total = await prompt_tokens(client, body)
        u = first["usage"]
        assert u["cache_read_input_tokens"] == 0 and 60 < u["cache_creation_input_tokens"] < total
        assert_sums(u, total)
        body2 = {**body, "messages": convo("Question two?")}  # same system, new question
        _, second = await post_msg(client, body2, "cc")
        u2 = second["usage"]
        assert u2["cache_read_input_tokens"] >= u["cache_creation_input_tokens"] - 2
        assert u2["cache_creation_input_tokens"] <= 2
        assert_sums(u2, await prompt_tokens(client, body2))

    async def test_caching_off_reports_zero_and_lists_nothing(self, make_client):
        """cache_enabled = false: usage counters 0, /v1/agents empty, warm refused with a 400."""
        client = await make_client(cache_enabled=False, **CACHE)
        _, second, _ = await two_turns(client)
        assert second["cache_read_input_tokens"] == 0
        assert (await (await client.get("/v1/agents")).json())["data"] == []
        r = await client.post("/v1/agents/a/warm", json=msg(convo("x")), headers=ANTHROPIC)
        assert r.status == 400


class TestTenants:
    async def test_another_key_never_hits_lists_or_deletes(self, make_client):
        """Same agent id under two API keys: the second misses, sees no entries, cannot delete."""
        client = await make_client(api_keys=["key-one", "key-two"], **CACHE)
        await two_turns(client, "shared-id", key="key-one")
        _, _, body = await two_turns(client, "other", key="key-one")
        _, other = await post_msg(client, body, "shared-id", key="key-two")
        assert other["usage"]["cache_read_input_tokens"] == 0
        two = {"x-api-key": "key-two"}
        listed = (await (await client.get("/v1/agents", headers=two)).json())["data"]
        assert [e["agent_id"] for e in listed] == ["shared-id"]  # its own new entry, none of key-one's
        r = await client.delete("/v1/agents/other", headers=two)
        assert r.status == 404
        one = await (await client.get("/v1/agents/other", headers={"x-api-key": "key-one"})).json()
        assert one["agent_id"] == "other"


class TestAgentIds:
    @pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "anon-123", "../etc", "é"])
    async def test_bad_agent_id_is_a_400_in_dialect(self, make_client, bad):
        """Invalid X-Agent-ID: 400 invalid_request_error naming the header (Anthropic and OpenAI shapes)."""
        client = await make_client()
        r = await client.post("/v1/messages", json=msg(convo("Hi")),
                              headers={**ANTHROPIC, "X-Agent-ID": bad.encode("utf-8").decode("latin-1")})
        assert r.status == 400
        body = await r.json()
        assert body["error"]["type"] == "invalid_request_error" and "X-Agent-ID" in body["error"]["message"]
        r = await client.post("/v1/chat/completions", headers={"X-Agent-ID": bad.encode("utf-8").decode("latin-1")},
                              json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status == 400 and (await r.json())["error"]["param"] == "X-Agent-ID"

    async def test_conflicting_headers_are_a_400(self, make_client):
        """X-Agent-ID and X-Session-ID naming different agents is refused, not guessed."""
        client = await make_client()
        r = await client.post("/v1/messages", json=msg(convo("Hi")),
                              headers={**ANTHROPIC, "X-Agent-ID": "a", "X-Session-ID": "b"})
        assert r.status == 400


class TestAgentsEndpoints:
    async def test_list_get_evict_then_disk_hit_then_delete(self, make_client, tmp_path):
        """List and get show the entry; evict moves it to disk; the next turn is a disk hit; delete
        removes it from memory and disk."""
        client = await make_client(cache_dir=str(tmp_path / "c"), **CACHE)
        _, _, body = await two_turns(client, "agent-e")
        listing = (await (await client.get("/v1/agents")).json())["data"]
        assert [e["agent_id"] for e in listing] == ["agent-e"] and listing[0]["tier"] == "memory"
        r = await client.post("/v1/agents/agent-e/evict")
        assert r.status == 200 and {e["tier"] for e in (await r.json())["entries"]} == {"disk"}
        await client.app[SERVICE].cache.settle()  # turn 1's file is deleted once turn 2's is written
        files = list((tmp_path / "c" / "entries").glob("*.safetensors"))
        assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o600"
        _, third = await post_msg(client, body, "agent-e")
        assert third["usage"]["cache_read_input_tokens"] > 0
        metrics = await (await client.get("/metrics")).text()
        assert 'semcache_cache_lookups_total{result="disk_hit"} 1.0' in metrics
        assert 'semcache_cache_bytes{tier="memory"}' in metrics
        r = await client.delete("/v1/agents/agent-e")
        assert r.status == 200 and (await r.json())["deleted"] is True
        await client.app[SERVICE].cache.settle()
        assert list((tmp_path / "c" / "entries").glob("*.safetensors")) == []
        assert (await client.get("/v1/agents/agent-e")).status == 404
        assert (await client.post("/v1/agents/agent-e/evict")).status == 404

    async def test_anonymous_entries_are_listed_and_reused(self, make_client):
        """Requests without an agent id store anon-... entries that later anonymous turns reuse."""
        client = await make_client(**CACHE)
        first, second, _ = await two_turns(client, agent=None)
        assert second["cache_read_input_tokens"] > 0
        ids = [e["agent_id"] for e in (await (await client.get("/v1/agents")).json())["data"]]
        assert ids and all(i.startswith("anon-") for i in ids)
        assert (await client.get(f"/v1/agents/{ids[0]}")).status == 200

    @pytest.mark.parametrize("dialect", ["anthropic", "openai"])
    async def test_warm_prefills_without_generating(self, make_client, dialect):
        """POST /v1/agents/{id}/warm stores the conversation's prompt; the first real turn reads it."""
        client = await make_client(**CACHE)
        if dialect == "anthropic":
            warm = {"model": "m", "system": SYSTEM, "messages": convo("First question?")}
            r = await client.post("/v1/agents/w1/warm", json=warm, headers=ANTHROPIC)
        else:
            warm = {"model": "m", "messages": [{"role": "system", "content": SYSTEM},
                                               {"role": "user", "content": "First question?"}]}
            r = await client.post("/v1/agents/w1/warm", json=warm)
        assert r.status == 200, await r.text()
        warmed = await r.json()
        assert warmed["prefilled_tokens"] == warmed["tokens"] > 60 and warmed["entry"]["tier"] == "memory"
        status, turn = await post_msg(client, msg(convo("First question?")), "w1")
        assert status == 200
        assert turn["usage"]["cache_read_input_tokens"] == warmed["tokens"]

    async def test_warm_with_a_bad_body_is_a_400(self, make_client):
        """Warm validates its body like the generation endpoints do."""
        client = await make_client(**CACHE)
        r = await client.post("/v1/agents/w2/warm", json={"model": "m", "messages": []})
        assert r.status == 400
        r = await client.post("/v1/agents/w2/warm", json={"system": SYSTEM, "messages": []}, headers=ANTHROPIC)
        assert r.status == 200
        r = await client.post("/v1/agents/anon-1/warm", json={"system": "x"}, headers=ANTHROPIC)
        assert r.status == 400

    @pytest.mark.parametrize("dialect", ["anthropic", "openai"])
    async def test_warm_of_a_prompt_shorter_than_min_prefix_is_a_400(self, make_client, dialect):
        """A prompt under cache_min_prefix tokens could never be hit, so it is not stored: a 400 that
        says so, in the caller's dialect (it was a 200 with a useless entry), and nothing is listed."""
        client = await make_client(cache_min_prefix=500)
        if dialect == "anthropic":
            r = await client.post("/v1/agents/w3/warm", json={"system": "x", "messages": []}, headers=ANTHROPIC)
        else:
            r = await client.post("/v1/agents/w3/warm", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status == 400
        body = await r.json()
        error = body["error"]
        assert "cache_min_prefix" in error["message"]
        assert (body["type"] == "error") if dialect == "anthropic" else (error["type"] == "invalid_request_error")
        assert (await client.get("/v1/agents/w3")).status == 404



class TestDeletionWins:
    """A request in flight when its agent (or tenant) is deleted answers, but stores nothing after."""

    async def test_a_request_in_flight_stores_nothing_once_its_agent_is_deleted(self, make_client, tokenizer):
        engine = FakeEngine(tokenizer, reply="word " * 40, step_delay=0.01)
        client = await make_client(engine, **CACHE)
        service = client.app[SERVICE]
        status, first = await post_msg(client, msg(convo("What is 2+2?")), "doomed")
        await settled(service)
        assert status == 200 and service.agents("default", "doomed")
        turn = msg(convo("What is 2+2?", first["content"][0]["text"], "And 3+3?"))
        running = asyncio.create_task(post_msg(client, turn, "doomed"))
        await until(lambda: service.num_running == 1)
        r = await client.delete("/v1/agents/doomed")
        assert r.status == 200 and (await r.json())["entries"] >= 1
        status, answer = await running
        assert status == 200 and answer["stop_reason"] == "max_tokens"  # the client still gets its answer
        await settled(service)  # its KV, and its canonical reply's prefill, would be stored by now
        assert service.agents("default", "doomed") == []
        assert (await client.get("/v1/agents/doomed")).status == 404
        status, _ = await post_msg(client, turn, "doomed")  # a request after the deletion is cached again
        await settled(service)
        assert status == 200 and service.agents("default", "doomed")

    async def test_a_tenant_purge_wins_over_its_requests_in_flight(self, make_client, tokenizer, tmp_path):
        keys = tmp_path / "keys"
        keys.write_text("alpha:k1\nbeta:k2\n")
        engine = FakeEngine(tokenizer, reply="word " * 40, step_delay=0.01)
        client = await make_client(engine, api_keys_file=str(keys), admin_key="adm", **CACHE)
        service = client.app[SERVICE]
        running = [asyncio.create_task(post_msg(client, msg(convo("Hello")), "a", key)) for key in ("k1", "k2")]
        await until(lambda: service.num_running == 2)
        r = await client.delete("/admin/tenants/alpha/agents", headers={"x-api-key": "adm"})
        assert r.status == 200
        assert [status for status, _ in await asyncio.gather(*running)] == [200, 200]
        await settled(service)
        listed = lambda key: client.get("/v1/agents", headers={"x-api-key": key})  # noqa: E731
        assert (await (await listed("k1")).json())["data"] == []
        assert len((await (await listed("k2")).json())["data"]) == 1  # the other tenant's is kept

    async def test_a_warm_up_in_flight_is_a_409_once_its_agent_is_deleted(self, make_client, tokenizer):
        engine = FakeEngine(tokenizer, step_delay=0.1)
        client = await make_client(engine, **CACHE)
        service = client.app[SERVICE]
        warm = {"model": "m", "system": SYSTEM, "messages": convo("First question?")}
        warming = asyncio.create_task(client.post("/v1/agents/w3/warm", json=warm, headers=ANTHROPIC))
        await until(lambda: service.num_running == 1)
        assert (await client.delete("/v1/agents/w3", headers=ANTHROPIC)).status == 404  # nothing stored yet
        r = await warming
        assert r.status == 409, await r.text()
        error = (await r.json())["error"]
        assert error["type"] == "invalid_request_error" and "deleted while it was being warmed" in error["message"]
        await settled(service)
        assert service.agents("default", "w3") == []
