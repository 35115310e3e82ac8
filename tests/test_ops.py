"""Operating semcache on a fake engine: keys and tenants, admin, priority, rate limits, metrics,
logs, model hot-swap, and the start-up exposure check."""

import asyncio
import json
import logging
import shutil
import subprocess

import anthropic
import openai
import pytest

from semcache.__main__ import check_auth, check_exposure, main
from semcache.ops import logs
from semcache.http.app import make_app
from semcache.http.appkeys import SERVICE
from semcache.ops.config import Config
from semcache.ops.logs import JsonFormatter
from semcache.ops.tenants import KeyRing, parse_keys_file
from tests.conftest import FakeEngine, count_tokenize, serve_in_thread, until

ANTHROPIC = {"anthropic-version": "2023-06-01"}
MSG = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
CHAT = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
LONG = {"model": "m", "max_tokens": 8, "system": "You are precise and brief. " * 10,
        "messages": [{"role": "user", "content": "Hi"}]}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class TestKeys:
    async def test_missing_or_wrong_key_is_401_in_each_dialect(self, make_client):
        """With keys: no key or a wrong one is 401 authentication_error, Anthropic or OpenAI shaped."""
        client = await make_client(api_keys=["sk-good"])
        r = await client.post("/v1/messages", json=MSG, headers=ANTHROPIC)
        assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
        body = await r.json()
        assert r.status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
        assert (await client.get("/health/ready")).status == 200
        assert (await client.get("/metrics")).status == 401
        r = await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "x-api-key": "sk-good"})
        assert r.status == 200

    async def test_metrics_can_be_exempted(self, make_client):
        """metrics_public = true lets a scraper read /metrics without a key."""
        client = await make_client(api_keys=["sk-good"], metrics_public=True)
        assert (await client.get("/metrics")).status == 200

    def test_sdks_raise_authentication_errors(self, tokenizer, tmp_path):
        """Both official SDKs map our 401 to their AuthenticationError."""
        config = Config(api_keys=["sk-good"], cache_dir=str(tmp_path))
        with serve_in_thread(make_app(config, engine=FakeEngine(tokenizer))) as url:
            with pytest.raises(anthropic.AuthenticationError):
                anthropic.Anthropic(base_url=url, api_key="bad", max_retries=0).messages.create(
                    model="m", max_tokens=4, messages=MSG["messages"])
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).chat.completions.create(
                    model="m", messages=CHAT["messages"])

    def test_keys_file_names_tenants(self):
        """`tenant:key` lines name the tenant; a bare key is its own; comments and blanks skipped."""
        keys = parse_keys_file("# team keys\nalpha:k1\nalpha:k2\n\nk3\n", "keys")
        assert keys == {"k1": "alpha", "k2": "alpha", "k3": "k3"}
        with pytest.raises(ValueError, match="keys:1"):
            parse_keys_file(":k", "keys")

    def test_reload_keeps_old_keys_on_error(self, tmp_path):
        """reload() picks up a rotated key; a broken file leaves the previous keys working."""
        path = tmp_path / "keys"
        path.write_text("alpha:old\n")
        ring = KeyRing([], str(path))
        assert ring.tenant("old") == "alpha" and ring.tenant("new") is None
        path.write_text("alpha:new\n")
        ring.reload()
        assert ring.tenant("new") == "alpha" and ring.tenant("old") is None
        path.write_text("alpha:\n")
        with pytest.raises(ValueError):
            ring.reload()
        assert ring.tenant("new") == "alpha"

    def test_keys_configured_but_none_in_force_stop_the_start(self, tmp_path, monkeypatch, capsys):
        """A keys file of only comments, or api_keys holding only empty strings (SEMCACHE_API_KEYS=","),
        would leave auth off: `serve` exits 2 and says why, instead of serving 0.0.0.0 unauthenticated."""
        monkeypatch.setattr(logs, "setup", lambda *a: pytest.fail("the daemon went on to serve"))
        keys = tmp_path / "keys"
        keys.write_text("# nobody yet\n\n")
        with pytest.raises(ValueError, match="no keys"):
            KeyRing([], str(keys))
        with pytest.raises(ValueError, match="empty"):
            KeyRing([""])
        config = tmp_path / "c.toml"
        config.write_text(f'api_keys_file = "{keys}"\n')
        assert main(["serve", "--host", "0.0.0.0", "--port", "1", "--config", str(config)]) == 2
        assert "no keys" in capsys.readouterr().err
        for value in (",", ""):
            monkeypatch.setenv("SEMCACHE_API_KEYS", value)
            assert main(["serve", "--port", "1"]) == 2  # on loopback too: keys were meant to be on
            assert "empty" in capsys.readouterr().err

    def test_emptying_the_keys_file_is_refused_on_reload(self, tmp_path):
        """A SIGHUP after the keys file was emptied or truncated keeps the previous keys."""
        path = tmp_path / "keys"
        path.write_text("alpha:k1\n")
        ring = KeyRing([], str(path))
        for text in ("", "# all revoked\n"):
            path.write_text(text)
            with pytest.raises(ValueError, match="no keys"):
                ring.reload()
            assert ring.enabled and ring.tenant("k1") == "alpha"

    def test_no_tenant_can_be_named_like_the_admin(self):
        """Tenant names (and keys) with control characters are refused, so no keys-file tenant or
        api_keys entry can share the admin's tenant ("\\x00admin") and its caches."""
        with pytest.raises(ValueError, match="keys:2.*control"):
            parse_keys_file("alpha:k1\n\x00admin:k2\n", "keys")
        with pytest.raises(ValueError, match="control"):
            KeyRing(["\x00admin"])

    async def test_metrics_key_is_the_scrapers_own(self, make_client):
        """With metrics_key, /metrics takes that key (or the admin key), never a tenant key; the
        metrics key opens nothing else."""
        client = await make_client(api_keys=["k"], admin_key="adm", metrics_key="scrape")
        get = lambda key: client.get("/metrics", headers={"x-api-key": key} if key else {})  # noqa: E731
        assert (await get("scrape")).status == 200 and (await get("adm")).status == 200
        assert (await get("k")).status == 403 and (await get("nope")).status == 401 and (await get(None)).status == 401
        r = await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "x-api-key": "scrape"})
        assert r.status == 401
        client = await make_client(metrics_key="scrape", cache_enabled=False)  # no API keys: still its key
        assert (await get(None)).status == 401 and (await get("scrape")).status == 200
        assert "empty" in check_auth(Config(metrics_key=""))
        assert "contradict" in check_auth(Config(metrics_key="scrape", metrics_public=True))

    async def test_health_shows_counts_only_to_key_holders(self, make_client):
        """/health/* answers everyone with its status code, but queue and active counts only to a
        caller with a valid key (tenant, admin or metrics) when API keys are configured."""
        client = await make_client(api_keys=["k"], admin_key="adm", metrics_key="scrape")
        for path in ("/health/ready", "/health/live", "/health/startup"):
            for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": "\u00ff"}):
                r = await client.get(path, headers=headers)
                body = await r.json()
                assert r.status == 200 and body["status"] == "ok" and "queue_depth" not in body and "active" not in body
            for key in ("k", "adm", "scrape"):
                body = await (await client.get(path, headers={"Authorization": f"Bearer {key}"})).json()
                assert body["queue_depth"] == 0 and body["active"] == 0

    async def test_rotated_key_keeps_its_tenants_caches(self, make_client, tmp_path):
        """Two keys of one tenant share its agent caches; another tenant's key sees none of them."""
        keys = tmp_path / "keys"
        keys.write_text("alpha:k-old\nalpha:k-new\nbeta:k-beta\n")
        client = await make_client(api_keys_file=str(keys), cache_min_prefix=16)
        h = {**ANTHROPIC, "X-Agent-ID": "a1"}
        await client.post("/v1/messages", json=LONG, headers={**h, "x-api-key": "k-old"})
        await asyncio.sleep(0.05)
        r = await client.post("/v1/messages", json=LONG, headers={**h, "x-api-key": "k-new"})
        assert (await r.json())["usage"]["cache_read_input_tokens"] > 0
        r = await client.post("/v1/messages", json=LONG, headers={**h, "x-api-key": "k-beta"})
        assert (await r.json())["usage"]["cache_read_input_tokens"] == 0


class TestAdmin:
    async def test_admin_routes_are_404_without_an_admin_key(self, make_client):
        """No admin_key configured: /admin/* does not exist."""
        client = await make_client()
        assert (await client.post("/admin/model", json={"model": "x"})).status == 404

    async def test_admin_routes_need_the_admin_key(self, make_client):
        """With admin_key: a wrong or API key is 401 on /admin/*."""
        client = await make_client(api_keys=["k"], admin_key="adm")
        r = await client.post("/admin/model", json={"model": "x"}, headers={"x-api-key": "k"})
        assert r.status == 401

    async def test_purge_deletes_a_tenants_caches(self, make_client, tmp_path):
        """DELETE /admin/tenants/{name}/agents removes that tenant's entries from memory and disk."""
        keys = tmp_path / "keys"
        keys.write_text("alpha:k1\nbeta:k2\n")
        client = await make_client(api_keys_file=str(keys), admin_key="adm", cache_min_prefix=16)
        for key in ("k1", "k2"):
            await client.post("/v1/messages", json=LONG, headers={**ANTHROPIC, "x-api-key": key, "X-Agent-ID": "a"})
        await asyncio.sleep(0.05)
        r = await client.delete("/admin/tenants/alpha/agents", headers={"x-api-key": "adm"})
        assert r.status == 200 and (await r.json())["deleted"] == 1
        listed = lambda key: client.get("/v1/agents", headers={"x-api-key": key})  # noqa: E731
        assert (await (await listed("k1")).json())["data"] == []
        assert len((await (await listed("k2")).json())["data"]) == 1

    async def test_purge_reaches_the_default_tenant(self, make_client):
        """Without API keys every caller is the tenant `default`: the admin purge route reaches it."""
        client = await make_client(admin_key="adm", cache_min_prefix=16)
        await client.post("/v1/messages", json=LONG, headers={**ANTHROPIC, "X-Agent-ID": "a"})
        await asyncio.sleep(0.05)
        assert len((await (await client.get("/v1/agents")).json())["data"]) == 1
        r = await client.delete("/admin/tenants/default/agents", headers={"x-api-key": "adm"})
        assert r.status == 200 and (await r.json())["deleted"] == 1
        assert (await (await client.get("/v1/agents")).json())["data"] == []

    async def test_hot_swap_and_failed_swap(self, make_client):
        """POST /admin/model swaps and /v1/models reports it; a failing load is a 400 and the old
        model keeps serving."""
        client = await make_client(admin_key="adm")
        admin = {"x-api-key": "adm"}
        r = await client.post("/admin/model", json={"model": "second-model"}, headers=admin)
        assert r.status == 200 and (await r.json())["model"] == "second-model"
        models = await (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["second-model"]
        r = await client.post("/admin/model", json={"model": "missing"}, headers=admin)
        assert r.status == 400 and "not swapped" in (await r.json())["error"]["message"]
        assert (await client.post("/v1/messages", json=MSG, headers=ANTHROPIC)).status == 200
        models = await (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["second-model"]

    async def test_swap_keeps_each_models_caches_apart(self, make_client):
        """After a swap the old model's entries are not served (nor lost): they are on disk under its
        fingerprint and serve again when it returns."""
        client = await make_client(admin_key="adm", cache_min_prefix=16)
        admin, h = {"x-api-key": "adm"}, {**ANTHROPIC, "X-Agent-ID": "a"}
        await client.post("/v1/messages", json=LONG, headers=h)
        await asyncio.sleep(0.05)
        assert (await client.post("/admin/model", json={"model": "other"}, headers=admin)).status == 200
        r = await client.post("/v1/messages", json=LONG, headers=h)
        assert (await r.json())["usage"]["cache_read_input_tokens"] == 0
        assert (await client.post("/admin/model", json={"model": "fake-model"}, headers=admin)).status == 200
        r = await client.post("/v1/messages", json=LONG, headers=h)
        assert (await r.json())["usage"]["cache_read_input_tokens"] > 0

    async def test_request_queued_for_the_old_model_is_refused_after_a_swap(self, make_client, tokenizer):
        """A prompt tokenized for the old model and still queued when it is swapped out is refused
        (retryable overloaded), never run on the new model with the old tokenizer's ids."""
        engine = FakeEngine(tokenizer, step_delay=0.02)
        client = await make_client(engine, admin_key="adm", max_active=1)
        running = asyncio.create_task(client.post("/v1/messages", json=MSG, headers=ANTHROPIC))
        await until(lambda: engine.admitted)  # running, not merely sent (a loaded machine is slow)
        queued = asyncio.create_task(client.post("/v1/messages", json=MSG, headers=ANTHROPIC))
        await until(lambda: client.app[SERVICE].scheduler.num_waiting)
        swap = await client.post("/admin/model", json={"model": "m3"}, headers={"x-api-key": "adm"})
        assert swap.status == 200 and (await running).status == 200
        r = await queued
        assert r.status == 529 and "Retry-After" in r.headers

    async def test_swap_waits_for_running_requests(self, make_client, tokenizer):
        """A request running when the swap starts finishes on the old model; one sent during the swap
        waits and is answered afterwards."""
        engine = FakeEngine(tokenizer, step_delay=0.02)
        client = await make_client(engine, admin_key="adm")
        running = asyncio.create_task(client.post("/v1/messages", json=MSG, headers=ANTHROPIC))
        await until(lambda: engine.admitted)  # running, not merely sent (a loaded machine is slow)
        swap = asyncio.create_task(client.post("/admin/model", json={"model": "m2"}, headers={"x-api-key": "adm"}))
        await asyncio.sleep(0.01)
        later = asyncio.create_task(client.post("/v1/messages", json=MSG, headers=ANTHROPIC))
        assert (await running).status == 200 and (await swap).status == 200 and (await later).status == 200


class TestPriority:
    async def test_urgent_priority_needs_the_admin_key(self, make_client):
        """With keys, X-Priority below the default is 403 permission_error unless the admin key is used."""
        client = await make_client(api_keys=["k"], admin_key="adm")
        r = await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "x-api-key": "k", "X-Priority": "1"})
        assert r.status == 403 and (await r.json())["error"]["type"] == "permission_error"
        r = await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "x-api-key": "k", "X-Priority": "7"})
        assert r.status == 200
        r = await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "x-api-key": "adm", "X-Priority": "0"})
        assert r.status == 200

    async def test_admin_key_alone_guards_urgent_priorities(self, make_client):
        """With an admin key but no API keys, X-Priority below the default still needs the admin key."""
        client = await make_client(admin_key="adm")
        r = await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "X-Priority": "0"})
        assert r.status == 403
        assert (await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "X-Priority": "9"})).status == 200


class TestRateLimits:
    async def test_429_with_headers_then_recovery(self, make_client):
        """After rpm requests a key gets 429 rate_limit_error with Retry-After and both dialects'
        rate-limit headers; once the bucket refills (fake clock) it is served again."""
        clock = FakeClock()
        client = await make_client(clock=clock, api_keys=["k"], rate_limit_rpm=3)
        h = {**ANTHROPIC, "x-api-key": "k"}
        for _ in range(3):
            r = await client.post("/v1/messages", json=MSG, headers=h)
            assert r.status == 200 and "anthropic-ratelimit-requests-remaining" in r.headers
        r = await client.post("/v1/messages", json=MSG, headers=h)
        assert r.status == 429 and (await r.json())["error"]["type"] == "rate_limit_error"
        assert int(r.headers["Retry-After"]) >= 1 and "retry-after-ms" in r.headers
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "k"})
        assert r.status == 429 and r.headers["x-ratelimit-limit-requests"] == "3"
        clock.now += 20  # one request's worth (3 per minute)
        assert (await client.post("/v1/messages", json=MSG, headers=h)).status == 200

    async def test_rpm_is_charged_before_any_template_work(self, make_client):
        """Each request is charged one request of rpm on arrival, count_tokens included: past the
        limit it is a 429 before its prompt is rendered, tokenized or its grammar compiled (the
        generation routes were charged only after all of that)."""

        client = await make_client(clock=FakeClock(), rate_limit_rpm=2)
        tokenized = count_tokenize(client.app[SERVICE])
        count = {"model": "m", "messages": MSG["messages"]}
        statuses = [(await client.post("/v1/messages", json=MSG, headers=ANTHROPIC)).status,
                    (await client.post("/v1/messages/count_tokens", json=count, headers=ANTHROPIC)).status,
                    (await client.post("/v1/messages", json=MSG, headers=ANTHROPIC)).status,
                    (await client.post("/v1/chat/completions", json={**CHAT, "n": 3})).status,
                    (await client.post("/v1/messages/count_tokens", json=count, headers=ANTHROPIC)).status]
        assert statuses == [200, 200, 429, 429, 429] and len(tokenized) == 2

    async def test_token_budget_is_charged_up_front_and_refunded(self, make_client):
        """tpm: the prompt and the first step of output (kv_grow_tokens) are charged before queueing
        and settled to actual use, so a large max_tokens costs only what is generated; a request
        whose prompt and first step could never fit the budget is a 400."""
        clock = FakeClock()
        client = await make_client(clock=clock, rate_limit_tpm=300, kv_grow_tokens=200)
        r = await client.post("/v1/messages", json={**MSG, "max_tokens": 250}, headers=ANTHROPIC)
        assert r.status == 200
        remaining = int(r.headers["anthropic-ratelimit-tokens-remaining"])
        assert remaining > 300 - 250  # refunded: the fake reply is 11 tokens
        clock.now += 60
        r = await client.post("/v1/messages", json={**MSG, "max_tokens": 32000}, headers=ANTHROPIC)
        assert r.status == 200  # charged for the 11 tokens it wrote, not for 32,000
        long = {**MSG, "messages": [{"role": "user", "content": "word " * 150}]}
        r = await client.post("/v1/messages", json={**long, "max_tokens": 1000}, headers=ANTHROPIC)
        assert r.status == 400

    async def test_refused_requests_get_their_tokens_back(self, make_client):
        """A request refused before it runs (here: too large for kv_budget) costs no tokens."""
        clock = FakeClock()
        client = await make_client(clock=clock, rate_limit_tpm=5000, kv_budget=60_000)  # 1000 bytes/token
        for _ in range(3):
            r = await client.post("/v1/messages", json={**MSG, "max_tokens": 200}, headers=ANTHROPIC)
            assert r.status == 400 and "kv_budget" in (await r.json())["error"]["message"]
        assert int(r.headers["anthropic-ratelimit-tokens-remaining"]) == 5000

    async def test_draining_refuses_with_503_in_both_dialects(self, make_client):
        """While draining, new requests get 503 with Retry-After, Anthropic and OpenAI alike."""

        client = await make_client()
        client.app[SERVICE].scheduler.draining = True
        r = await client.post("/v1/messages", json=MSG, headers=ANTHROPIC)
        assert r.status == 503 and r.headers["Retry-After"] and (await r.json())["error"]["type"] == "overloaded_error"
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status == 503 and r.headers["Retry-After"]
        assert (await client.get("/health/ready")).status == 503

    async def test_only_the_warm_route_charges_itself(self, make_client):
        """A path that merely ends in /warm is charged its request like any other; the real warm
        route is charged once, by the service (prompt tokenized), like a generation."""
        clock = FakeClock()
        client = await make_client(clock=clock, rate_limit_rpm=1)
        assert (await client.get("/v1/models/warm")).status == 200
        r = await client.get("/v1/models/warm")
        assert r.status == 429 and "Retry-After" in r.headers
        clock.now += 60
        warm = {"model": "m", "system": "Be brief. " * 40, "messages": [{"role": "user", "content": "Hi"}]}
        assert (await client.post("/v1/agents/a/warm", json=warm, headers=ANTHROPIC)).status == 200
        assert (await client.post("/v1/agents/a/warm", json=warm, headers=ANTHROPIC)).status == 429

    async def test_failed_authentication_is_throttled_per_address(self, make_client):
        """Repeated bad keys from one address get 429 with Retry-After in the route's dialect, even
        for a right key sent then (no guess is checked while throttled), until the budget refills."""
        clock = FakeClock()
        client = await make_client(clock=clock, api_keys=["k"])
        bad = {**ANTHROPIC, "x-api-key": "guess"}
        statuses = [(await client.post("/v1/messages", json=MSG, headers=bad)).status for _ in range(12)]
        assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
        r = await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "x-api-key": "k"})
        assert r.status == 429 and (await r.json())["type"] == "error" and int(r.headers["Retry-After"]) >= 1
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer guess"})
        assert r.status == 429 and (await r.json())["error"]["type"] == "rate_limit_error"
        body = await (await client.get("/health/ready", headers={"x-api-key": "k"})).json()
        assert "queue_depth" not in body  # health keeps its status code but checks no key either
        clock.now += 6
        assert (await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "x-api-key": "k"})).status == 200

    async def test_without_api_keys_only_key_checks_are_throttled(self, make_client):
        """No API keys, an admin key: wrong admin keys throttle the admin routes (and admin
        priorities) of that address, never its ordinary requests, which compare no key (the SDKs
        send one anyway)."""
        client = await make_client(clock=FakeClock(), admin_key="admin")
        bad = {"x-api-key": "guess"}
        statuses = [(await client.delete("/admin/tenants/t/agents", headers=bad)).status for _ in range(11)]
        assert statuses[:10] == [401] * 10 and statuses[10] == 429
        assert (await client.delete("/admin/tenants/t/agents", headers={"x-api-key": "admin"})).status == 429
        assert (await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "x-api-key": "local"})).status == 200
        assert (await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "X-Priority": "1"})).status == 429

    async def test_forwarded_for_counts_only_from_trusted_proxies(self, make_client):
        """Behind a proxy in trusted_proxies, each client address in X-Forwarded-For has its own
        failure budget; from anyone else the header is ignored, so it cannot dodge the throttle."""
        clock = FakeClock()
        client = await make_client(clock=clock, api_keys=["k"], trusted_proxies=["127.0.0.0/8"])
        via = lambda client_ip: {"x-api-key": "guess", "X-Forwarded-For": f"6.6.6.6, {client_ip}"}  # noqa: E731
        statuses = [(await client.get("/v1/models", headers=via("1.1.1.1"))).status for _ in range(11)]
        assert statuses[-2:] == [401, 429]
        assert (await client.get("/v1/models", headers=via("2.2.2.2"))).status == 401
        client = await make_client(clock=clock, api_keys=["k"], cache_enabled=False)
        statuses = [(await client.get("/v1/models", headers=via(f"1.1.1.{i}"))).status for i in range(11)]
        assert statuses[-2:] == [401, 429]

    async def test_health_is_never_limited(self, make_client):
        """/health/* is exempt from rate limits."""
        client = await make_client(clock=FakeClock(), rate_limit_rpm=1)
        for _ in range(5):
            assert (await client.get("/health/ready")).status == 200


class TestMetricsAndLogs:
    async def test_metrics_move(self, make_client):
        """Request counts by route and status, TTFT, tokens and queue gauges change as requests run."""
        client = await make_client(api_keys=["k"])
        await client.post("/v1/messages", json=MSG, headers=ANTHROPIC)  # 401, counted too
        await client.post("/v1/messages", json=MSG, headers={**ANTHROPIC, "x-api-key": "k"})
        text = await (await client.get("/metrics", headers={"x-api-key": "k"})).text()
        assert 'semcache_requests_total{route="/v1/messages",status="401"} 1.0' in text
        assert 'semcache_requests_total{route="/v1/messages",status="200"} 1.0' in text
        assert "semcache_time_to_first_token_seconds_count 1.0" in text
        assert "semcache_generated_tokens_total 8.0" in text  # max_tokens 8
        for name in ("semcache_queue_depth", "semcache_active_sequences", "semcache_step_duration_seconds_count",
                     "semcache_process_max_resident_memory_bytes", "semcache_cache_bytes"):
            assert name in text

    @pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed: `make test` installs it as root, else run `sudo apt-get install prometheus`")
    async def test_promtool_accepts_the_metrics(self, make_client):
        """promtool check metrics finds no problems in /metrics."""
        client = await make_client()
        await client.post("/v1/messages", json=MSG, headers=ANTHROPIC)
        text = await (await client.get("/metrics")).text()
        out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr

    async def test_access_line_has_fields_and_no_prompt(self, make_client, caplog):
        """One access record per request with id, route, status, tokens, cache result and TTFT; the
        prompt text is not in it."""
        client = await make_client()
        with caplog.at_level(logging.INFO, logger="semcache.access"):
            r = await client.post("/v1/messages", json={**MSG, "messages": [{"role": "user", "content": "SECRET"}]},
                                  headers=ANTHROPIC)
        record = next(rec for rec in caplog.records if rec.name == "semcache.access")
        fields = record.fields
        assert fields["request_id"] == r.headers["request-id"] and fields["status"] == 200
        assert fields["route"] == "/v1/messages" and fields["output_tokens"] == 8
        assert fields["cache"] == "miss" and fields["ttft_ms"] is not None
        line = JsonFormatter().format(record)
        assert json.loads(line)["request_id"] == fields["request_id"] and "SECRET" not in line


class TestExposure:
    def test_non_loopback_without_keys_needs_the_flag(self):
        """Listening beyond loopback with no keys is refused unless allow_unauthenticated is set."""
        assert check_exposure(Config()) is None
        assert "without API keys" in check_exposure(Config(host="0.0.0.0"))
        assert check_exposure(Config(host="0.0.0.0", api_keys=["k"])) is None
        assert check_exposure(Config(host="0.0.0.0", allow_unauthenticated=True)) is None

    def test_serve_exits_2_when_exposed(self, capsys):
        """`semcache serve --host 0.0.0.0` without keys exits 2 and says why."""
        assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
        assert "--allow-unauthenticated" in capsys.readouterr().err
