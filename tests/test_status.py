"""Seeing the cache work: the x-semcache-* headers of every generation (both dialects, streamed or
not), the access log's hit vocabulary, and GET /v1/status with its tenant scoping."""

import json
import logging

from semcache.http.appkeys import SERVICE
from tests.conftest import FakeEngine
from tests.test_agents_api import ANTHROPIC, CACHE, SYSTEM, convo, msg

HEADERS = ("x-semcache-cache", "x-semcache-cached-tokens", "x-semcache-agent")


async def anthropic_turn(client, messages, agent, stream=False, key=None):
    headers = {**ANTHROPIC, "X-Agent-ID": agent, **({"x-api-key": key} if key else {})}
    r = await client.post("/v1/messages", json=msg(messages, stream=stream), headers=headers)
    assert r.status == 200
    text = await r.text()
    if stream:
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        reply = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    else:
        reply = json.loads(text)["content"][0]["text"]
    return r.headers, reply


async def openai_turn(client, messages, agent, stream=False):
    body = {"model": "m", "max_tokens": 16, "stream": stream,
            "messages": [{"role": "system", "content": SYSTEM}, *messages]}
    r = await client.post("/v1/chat/completions", json=body, headers={"X-Agent-ID": agent})
    assert r.status == 200
    text = await r.text()
    if stream:
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        reply = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    else:
        reply = json.loads(text)["choices"][0]["message"]["content"]
    return r.headers, reply


def hit(headers) -> tuple[str, int, str]:
    return headers["x-semcache-cache"], int(headers["x-semcache-cached-tokens"]), headers["x-semcache-agent"]


class TestHeaders:
    async def test_anthropic_miss_then_memory_hit_streamed_and_not(self, make_client, tmp_path):
        """Turn 1 is a miss with 0 cached tokens; turn 2 a memory hit naming how many; a stream has
        the same headers (they are known at admission)."""
        for stream in (False, True):
            client = await make_client(cache_dir=str(tmp_path / f"c{stream}"), **CACHE)
            first, reply = await anthropic_turn(client, convo("What is 2+2?"), "ag", stream)
            assert hit(first) == ("miss", 0, "ag")
            second, _ = await anthropic_turn(client, convo("What is 2+2?", reply, "And 3+3?"), "ag", stream)
            kind, cached, agent = hit(second)
            assert kind == "memory" and cached > 60 and agent == "ag"

    async def test_openai_miss_then_memory_hit_streamed_and_not(self, make_client, tmp_path):
        for stream in (False, True):
            client = await make_client(cache_dir=str(tmp_path / f"c{stream}"), **CACHE)
            first, reply = await openai_turn(client, [{"role": "user", "content": "Hi"}], "oa", stream)
            assert hit(first) == ("miss", 0, "oa")
            turn2 = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply},
                     {"role": "user", "content": "More"}]
            second, _ = await openai_turn(client, turn2, "oa", stream)
            kind, cached, _ = hit(second)
            assert kind == "memory" and cached > 60

    async def test_disk_hit_after_evict_and_anonymous_agent(self, make_client):
        """An entry evicted to disk serves the next turn as a `disk` hit; a request naming no agent
        says `anonymous`."""
        client = await make_client(**CACHE)
        _, reply = await anthropic_turn(client, convo("What is 2+2?"), "ev")
        assert (await client.post("/v1/agents/ev/evict")).status == 200
        second, _ = await anthropic_turn(client, convo("What is 2+2?", reply, "And 3+3?"), "ev")
        assert hit(second)[0] == "disk" and hit(second)[1] > 60
        r = await client.post("/v1/messages", json=msg(convo("Hello")), headers=ANTHROPIC)
        assert r.headers["x-semcache-agent"] == "anonymous"

    async def test_a_hit_the_engine_refuses_is_reported_as_a_miss(self, make_client, tokenizer, caplog):
        """The engine fails on the hit and prefills from scratch: nothing was reused, so the answer
        and its access-log line say `miss` with 0 cached tokens."""
        engine = FakeEngine(tokenizer)
        client = await make_client(engine, **CACHE)
        _, reply = await anthropic_turn(client, convo("What is 2+2?"), "rj")
        engine.reject_prefixes = True
        with caplog.at_level(logging.INFO, logger="semcache.access"):
            second, _ = await anthropic_turn(client, convo("What is 2+2?", reply, "And 3+3?"), "rj")
        assert hit(second) == ("miss", 0, "rj")
        [line] = [rec.fields for rec in caplog.records if rec.name == "semcache.access"]
        assert line["cache"] == "miss" and line["cached_tokens"] == 0

    async def test_access_log_uses_the_same_words(self, make_client, caplog):
        client = await make_client(**CACHE)
        with caplog.at_level(logging.INFO, logger="semcache.access"):
            _, reply = await anthropic_turn(client, convo("What is 2+2?"), "lg")
            await anthropic_turn(client, convo("What is 2+2?", reply, "And 3+3?"), "lg")
        lines = [rec.fields for rec in caplog.records if rec.name == "semcache.access"]
        assert [f["cache"] for f in lines] == ["miss", "memory"]
        assert lines[1]["agent"] == "lg" and lines[1]["cached_tokens"] > 0


async def status(client, key=None):
    r = await client.get("/v1/status", headers={"x-api-key": key} if key else {})
    return r.status, await r.json()


class TestStatus:
    async def test_reports_model_tiers_requests_agents_and_window(self, make_client):
        client = await make_client(**CACHE)
        _, reply = await anthropic_turn(client, convo("What is 2+2?"), "st")
        await anthropic_turn(client, convo("What is 2+2?", reply, "And 3+3?"), "st")
        code, body = await status(client)
        assert code == 200
        info = client.app[SERVICE].info
        assert body["model"] == {"id": info.model_id, "fingerprint": info.fingerprint}
        assert body["uptime_seconds"] >= 0 and body["queue_depth"] == 0 and body["active"] == 0
        memory = body["tiers"]["memory"]
        assert memory["entries"] == 1 and 0 < memory["bytes"] <= memory["budget"]
        assert [(r["agent"], r["cache"]) for r in body["requests"]] == [("st", "memory"), ("st", "miss")]
        newest = body["requests"][0]
        assert newest["route"] == "/v1/messages" and newest["status"] == 200 and newest["cached_tokens"] > 0
        assert newest["prompt_tokens"] > newest["cached_tokens"] and newest["output_tokens"] > 0
        assert newest["ttft_ms"] is not None and newest["duration_ms"] >= newest["ttft_ms"]
        [agent] = body["agents"]
        assert agent["agent_id"] == "st" and agent["tier"] == "memory" and agent["bytes"] == memory["bytes"]
        window = body["window"]
        assert window["seconds"] == 300 and window["requests"] == 2 and window["hit_rate"] == 0.5
        assert window["ttft_ms"]["p50"] is not None and window["ttft_ms"]["p95"] >= window["ttft_ms"]["p50"]

    async def test_a_tenant_sees_its_own_and_the_admin_sees_all(self, make_client):
        client = await make_client(api_keys=["key-one", "key-two"], admin_key="adm", **CACHE)
        await anthropic_turn(client, convo("Hi one"), "one", key="key-one")
        await anthropic_turn(client, convo("Hi two"), "two", key="key-two")
        for key, agents in (("key-one", ["one"]), ("key-two", ["two"])):
            code, body = await status(client, key)
            assert code == 200
            assert [a["agent_id"] for a in body["agents"]] == agents
            assert [r["agent"] for r in body["requests"]] == agents
            assert body["tiers"]["memory"]["entries"] == 1 and "tenant" not in body["agents"][0]
        code, body = await status(client, "adm")
        assert code == 200 and sorted(a["agent_id"] for a in body["agents"]) == ["one", "two"]
        assert len({a["tenant"] for a in body["agents"]}) == 2 and len(body["requests"]) == 2
        assert body["tiers"]["memory"]["entries"] == 2
        assert (await status(client))[0] == 401 and (await status(client, "wrong"))[0] == 401

    async def test_polling_never_spends_the_rate_limit(self, make_client):
        """The page polls every second: /v1/status is not charged to the key's requests per minute,
        so watching never starves the key's agents."""
        client = await make_client(api_keys=["k"], rate_limit_rpm=2, **CACHE)
        for _ in range(4):
            assert (await status(client, "k"))[0] == 200
        await anthropic_turn(client, convo("Hi"), "rl", key="k")
        await anthropic_turn(client, convo("Hello"), "rl", key="k")

    async def test_limit_parameter_is_checked(self, make_client):
        client = await make_client()
        for bad in ("abc", "0", "501", "-1", "²", "١٢", "9" * 5000):
            r = await client.get("/v1/status", params={"limit": bad})
            assert r.status == 400 and (await r.json())["error"]["param"] == "limit", bad
        assert (await client.get("/v1/status?limit=1")).status == 200


class TestStatusPage:
    async def test_page_is_open_self_contained_and_keeps_keys_out_of_urls(self, make_client):
        client = await make_client(api_keys=["k"])
        r = await client.get("/status")
        assert r.status == 200 and r.content_type == "text/html"
        page = await r.text()
        assert "sessionStorage" in page and "x-api-key" in page and "/v1/status" in page
        for outside in ("http://", "https://", "//cdn", "<link", "src="):
            assert outside not in page
