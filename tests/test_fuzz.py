"""Hostile bodies on every POST route: never a 5xx, every error in the route's dialect,
and the daemon still answers correctly afterwards. Plus a regression test for each bug it found,
and hostile agent cache files (planted header fields): quarantined or served exactly, never a crash."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings, strategies as st

from semcache.cache import entryfile as store
from semcache.cache.cachedir import lock_dir
from semcache.cache.index import AgentCache, CacheLimits
from semcache.http.anthropic import CountTokensRequest, chat_messages as anthropic_chat_messages
from semcache.http.app import make_app
from semcache.text.chat import ChatMessage, StopMatcher, merge_turns
from semcache.ops.config import Config
from tests.conftest import FAKE_LAYOUT, FAKE_REPLY, FakeEngine, fake_kv, rewrite_header, serve_in_thread

ADMIN_KEY = "fuzz-admin-key"
MAX_BODY = 64 << 10  # small, so an oversized body is cheap to send
ANTHROPIC_VERSION = {"anthropic-version": "2023-06-01"}
ANTHROPIC, OPENAI, BY_HEADER = "anthropic", "openai", "anthropic-version header, else openai"
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    503: "overloaded_error", 529: "overloaded_error",
}
SENT: Counter = Counter()  # route template -> bodies sent by the fuzz tests
RAW = "\x00raw\x00"  # placeholder value, replaced by raw (not JSON-encodable) bytes after encoding
BAD_UTF8 = "\x00utf8\x00"  # placeholder inside a string, replaced by invalid UTF-8 bytes

# ---- valid-looking bodies, one strategy per kind of route -------------------------------------

text = st.text(st.characters(codec="utf-8"), max_size=40)
small_text = st.sampled_from(["Hi", "What is 2+2?", "Tell me a story.", "", " ", "é漢字💥"]) | text
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CLAUDE_TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": SCHEMA}]
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]
text_block = st.fixed_dictionaries(
    {"type": st.just("text"), "text": small_text},
    optional={"cache_control": st.just({"type": "ephemeral"})},
)
anthropic_block = text_block | st.just({"type": "thinking", "thinking": "hm", "signature": "x"})
anthropic_message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant"]),
    "content": small_text | st.lists(anthropic_block, min_size=1, max_size=3),
})
anthropic_messages = st.lists(anthropic_message, min_size=1, max_size=4).map(
    lambda ms: [{"role": "user", "content": "Hi"}] + ms if ms[0]["role"] != "user" else ms)
openai_message = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant"]),
    "content": small_text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": small_text}),
                                     min_size=1, max_size=2),
})
openai_messages = st.lists(openai_message, min_size=1, max_size=4).map(
    lambda ms: ms + [{"role": "user", "content": "Hi"}])
USER = {"role": "user", "content": "Weather in Paris?"}
CLAUDE_TOOL_TURNS = [USER, {"role": "assistant", "content": [  # a call and its result, sent back
    {"type": "text", "text": "I'll check."},
    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]}]
OPENAI_TOOL_TURNS = [USER, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]


def bodies(required: dict, optional: dict, tools: list, tool_turns: list) -> st.SearchStrategy:
    """Plain conversations, and (one in three) tools declared with a call-and-result history."""
    plain = st.fixed_dictionaries(required, optional=optional)
    with_tools = {**required, "tools": st.just(tools), "messages": st.sampled_from([tool_turns, tool_turns, [USER]])}
    return plain | plain | st.fixed_dictionaries(with_tools, optional=optional)


# Stop strings around the caps (64 strings, 8,192 characters in all): a few, 60-70, and long ones.
many_stops = (st.integers(60, 70).flatmap(lambda n: st.lists(small_text, min_size=n, max_size=n))
              | st.integers(1, 5).map(lambda n: ["x" * 2100] * n))
anthropic_prompt = {"model": st.just("claude-fuzz"), "messages": anthropic_messages}
anthropic_optional = {
    "system": small_text | st.lists(text_block, max_size=2),
    "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"},
                                    {"type": "tool", "name": "get_weather"}]),
}
message_body = bodies({**anthropic_prompt, "max_tokens": st.integers(1, 16)}, {
    **anthropic_optional,
    "stop_sequences": st.lists(small_text, max_size=3) | many_stops,
    "stream": st.booleans(),
    "temperature": st.floats(0, 1),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(0, 50),
    "metadata": st.just({"user_id": "u-1"}),
}, CLAUDE_TOOLS, CLAUDE_TOOL_TURNS)
count_body = bodies(anthropic_prompt, anthropic_optional, CLAUDE_TOOLS, CLAUDE_TOOL_TURNS)
chat_body = bodies({"model": st.just("gpt-fuzz"), "messages": openai_messages}, {
    "max_tokens": st.integers(1, 16),
    "max_completion_tokens": st.integers(1, 16),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "n": st.integers(1, 3),
    "stop": small_text | st.lists(small_text, max_size=4) | many_stops,
    "stream": st.booleans(),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "user": text,
    "tool_choice": st.sampled_from(["auto", "none", "required",
                                    {"type": "function", "function": {"name": "get_weather"}}]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                        {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}]),
}, OPENAI_TOOLS, OPENAI_TOOL_TURNS)
warm_anthropic = st.fixed_dictionaries({"model": st.just("claude-fuzz"), "system": small_text,
                                        "messages": anthropic_messages | st.just(CLAUDE_TOOL_TURNS)},
                                       optional={"tools": st.just(CLAUDE_TOOLS)})
warm_openai = st.fixed_dictionaries({"model": st.just("gpt-fuzz"), "messages": openai_messages
                                     | st.just(OPENAI_TOOL_TURNS)}, optional={"tools": st.just(OPENAI_TOOLS)})
swap_body = st.fixed_dictionaries({"model": st.sampled_from(["fake-model", "missing", "other-model", ""]) | text})


@dataclass(frozen=True)
class Route:
    dialect: str  # ANTHROPIC, OPENAI, or BY_HEADER (an anthropic-version header picks Anthropic)
    bodies: st.SearchStrategy  # valid-looking bodies, mutated by `hostile_requests` below
    examples: int  # hypothesis examples; the routes' budgets add up to >= 1,000
    path_ids: bool = False  # the path holds an agent id, fuzzed too
    admin: bool = False


ROUTES = {
    "/v1/messages": Route(ANTHROPIC, message_body, 250),
    "/v1/messages/count_tokens": Route(ANTHROPIC, count_body, 120),
    "/v1/chat/completions": Route(OPENAI, chat_body, 250),
    "/chat/completions": Route(OPENAI, chat_body, 100),
    "/v1/agents/{agent_id}/warm": Route(BY_HEADER, warm_anthropic | warm_openai, 150, path_ids=True),
    "/v1/agents/{agent_id}/evict": Route(BY_HEADER, warm_openai | st.none(), 60, path_ids=True),
    "/admin/model": Route(BY_HEADER, swap_body, 80, admin=True),
}

# ---- hostile mutations --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)


def deep_object(depth: int) -> dict:
    """{"a": {"a": ... 1}}, `depth` objects deep (built without recursion)."""
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value


# Deep nesting (tool schemas, response formats, tool_use input; arguments as JSON text), around
# the limit of 100 levels; deeper objects than ~400 would not even encode in this test's json.dumps.
deep_objects = (st.sampled_from([100, 101]) | st.integers(95, 400)).map(deep_object)
depths = st.sampled_from([100, 101, 2_000, 20_000, 100_000])  # Python's json gives up near 1,000
deep_texts = depths.map(lambda d: '{"a":' * d + "1" + "}" * d) | depths.map(lambda d: "[" * d + "]" * d)
RECURSION_POINTS = {"arguments", "input", "parameters", "input_schema", "schema", "properties"}
hostile_values = st.sampled_from([
    None, True, False, 0, -1, 10**30, -(10**30), 2**63, 2**64, -(2**63) - 1, 1e308, -1e308, 5e-324, 0.5,
    "", "x" * 20_000, [], {}, [[]], [{}], ["a"] * 5_000, [None], {"type": "text"}, {"type": "image"},
    {"type": "tool_use"}, {"type": "nope", "text": 1}, {"type": "text", "text": 7}, "user", "assistant",
    "system", "tool", "developer", "function", "bogus-role", "\u0000", "💥" * 100,
    [{"role": "user"}], [{"role": "user", "content": None}], [{"role": "tool", "content": "x"}],
]) | json_values
raw_tokens = st.sampled_from([
    b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" * 400, b"-0", b"01", b"1.", b".5", b"0x10",
    b"+1", b"tru", b"undefined", b"'single'", b'"\\ud800"', b'"\\udc00"', b'"\\x41"', b'"\\u00"', b'"a',
    b"[1,]", b"{,}", b'{"a" 1}', b"\x00", b"",
]) | st.integers(100, 20_000).flatmap(
    lambda depth: st.sampled_from([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth])
)
bad_utf8 = st.sampled_from([b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
                            b"\xe2\x82", b"ok\xc3", b"\xf8\x88\x80\x80\x80"])
content_types = st.sampled_from([
    "application/json", None, "text/plain", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/json; charset=latin-1", "application/octet-stream",
])
agent_ids = st.just("fuzz-agent") | st.sampled_from(["a", "anon-x", "a" * 129, "bad id", "ü", "%2F"]) | text


def paths_in(value, prefix=()):
    """Every (path) to a value inside a JSON document, including the root."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from paths_in(child, prefix + (key,))


def set_at(doc, path, value):
    """A copy of `doc` with `value` at `path`."""
    if not path:
        return value
    doc, parent = _walk(doc, path)
    parent[path[-1]] = value
    return doc


def delete_at(doc, path):
    """A copy of `doc` without the key or item at `path`."""
    doc, parent = _walk(doc, path)
    del parent[path[-1]]
    return doc


def _walk(doc, path):
    """(a deep copy of doc, the copy's container of the last step of path)."""
    doc = json.loads(json.dumps(doc))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    return doc, parent


def encode(doc, raw: bytes = b"") -> bytes:
    """JSON bytes of `doc`, with the RAW / BAD_UTF8 placeholders replaced by `raw`."""
    data = json.dumps(doc, ensure_ascii=False).encode()
    data = data.replace(json.dumps(RAW).encode(), raw)
    return data.replace(json.dumps(BAD_UTF8)[1:-1].encode(), raw)


@st.composite
def mutated(draw, bodies):
    """A valid-looking body with one thing wrong (or none): a field replaced, removed, made raw,
    a string made invalid UTF-8, or an unknown field added."""
    doc = draw(bodies)
    if doc is None:
        return b""
    path = draw(st.sampled_from(list(paths_in(doc))))
    how = draw(st.sampled_from(["keep", "replace", "delete", "raw", "utf8", "unknown", "deep", "deep"]))
    if how == "deep":  # tool schemas, arguments (JSON text) and inputs nested around and past the limit
        points = [p for p in paths_in(doc) if p and p[-1] in RECURSION_POINTS] or [path]
        points += [p for p in points if p[-1:] == ("arguments",)]  # the one that was a 500: twice as often
        point = draw(st.sampled_from(points))
        return encode(set_at(doc, point, draw(deep_texts if point[-1:] == ("arguments",) else deep_objects)))
    if how == "replace":
        return encode(set_at(doc, path, draw(hostile_values)))
    if how == "delete" and path:
        return encode(delete_at(doc, path))
    if how == "raw":
        return encode(set_at(doc, path, RAW), draw(raw_tokens))
    if how == "utf8":
        return encode(set_at(doc, path, "a" + BAD_UTF8 + "b"), draw(bad_utf8))
    if how == "unknown" and isinstance(doc, dict):
        return encode({**doc, draw(text): RAW}, encode(draw(hostile_values)) if draw(st.booleans())
                      else draw(raw_tokens))
    return encode(doc)


@st.composite
def raw_bodies(draw, bodies):
    """Whole bodies that are not a JSON object, or are broken: random JSON, random bytes, a
    truncated document, a byte-order mark, oversized (> max_body) or nested 10,000 deep."""
    doc = draw(bodies)
    valid = encode(doc) if doc is not None else b"{}"
    kind = draw(st.sampled_from(["json", "bytes", "truncated", "bom", "oversized", "deep", "text"]))
    if kind == "json":
        return encode(draw(json_values))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "truncated":
        return valid[: draw(st.integers(0, max(0, len(valid) - 1)))]
    if kind == "bom":
        return b"\xef\xbb\xbf" + valid
    if kind == "oversized":
        pad = MAX_BODY + draw(st.integers(1, 4096))
        return valid[:-1] + b',"pad":"' + b"x" * pad + b'"}' if valid.endswith(b"}") else b"[" * pad
    if kind == "deep":
        depth = draw(st.integers(500, 10_000))
        return b"[" * depth + b"]" * depth
    return draw(text).encode()


@dataclass
class Request:
    path: str
    body: bytes
    headers: dict
    anthropic: bool  # the dialect its errors must be in


@st.composite
def hostile_requests(draw, template: str):
    """One request to a route: a body from `mutated` or `raw_bodies`, with assorted headers."""
    route = ROUTES[template]
    path = template
    if route.path_ids:
        path = template.replace("{agent_id}", quote(draw(agent_ids), safe="") or "x")
    headers = {}
    if route.dialect == BY_HEADER and draw(st.booleans()):
        headers.update(ANTHROPIC_VERSION)
    content_type = draw(content_types)
    if content_type:
        headers["Content-Type"] = content_type
    if route.admin:
        headers["x-api-key"] = draw(st.sampled_from([ADMIN_KEY] * 5 + ["wrong-key"]))
        if headers["x-api-key"] != ADMIN_KEY:  # a guesser elsewhere (behind the trusted proxy), whose
            headers["X-Forwarded-For"] = GUESSER  # address the failed-auth throttle soon refuses
    extra = draw(st.sampled_from([{}, {}, {}, {"X-Agent-ID": "fuzz-agent"}, {"X-Agent-ID": "bad id!"},
                                  {"X-Priority": "7"}, {"X-Priority": "1"}, {"X-Priority": "1e9"},
                                  {"X-Agent-ID": "a", "X-Session-ID": "b"}]))
    headers.update(extra)
    body = draw(st.one_of(mutated(route.bodies), mutated(route.bodies), raw_bodies(route.bodies)))
    if draw(st.integers(0, 19)) == 0:  # now and then, a Content-Encoding the body may not match
        encoding = draw(st.sampled_from(["gzip", "deflate"]))
        headers["Content-Encoding"] = encoding
        if draw(st.booleans()):
            body = gzip.compress(body) if encoding == "gzip" else body
    anthropic = route.dialect == ANTHROPIC or "anthropic-version" in headers
    return Request(path, body, headers, anthropic)


# ---- a live daemon on the fake engine, and a client that sends any bytes --------------------------


class Client:
    """One keep-alive connection (reopened when the server closes it) that sends bytes as given."""

    def __init__(self, base_url: str):
        self.host, self.port = urlsplit(base_url).hostname, urlsplit(base_url).port
        self.conn: http.client.HTTPConnection | None = None

    def send(self, method: str, path: str, body: bytes = b"", headers: dict | None = None):
        """(status, headers, body bytes). A reused connection the server closed meanwhile is retried
        once on a new one; a fresh connection that fails raises."""
        reused = self.conn is not None
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            data = response.read()
        except (http.client.RemoteDisconnected, ConnectionError):
            self.close()
            if not reused:
                raise
            return self.send(method, path, body, headers)
        except Exception:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, response.headers, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


GUESSER = "10.66.0.1"


def start_daemon(tokenizer, tmp_path_factory, **overrides):
    config = Config(cache_dir=str(tmp_path_factory.mktemp("fuzz") / "cache"), admin_key=ADMIN_KEY,
                    cache_write_through=False, trusted_proxies=["127.0.0.1"], **overrides)
    return serve_in_thread(make_app(config, engine=FakeEngine(tokenizer)))


@pytest.fixture(scope="module")
def daemon(tokenizer, tmp_path_factory):
    with start_daemon(tokenizer, tmp_path_factory, max_body=MAX_BODY) as url:
        client = Client(url)
        yield client
        client.close()


@pytest.fixture(scope="module")
def roomy_daemon(tokenizer, tmp_path_factory):
    """The default max_body (32 MiB), for the big-but-legal bodies."""
    with start_daemon(tokenizer, tmp_path_factory) as url:
        client = Client(url)
        yield client
        client.close()


# ---- what every answer must look like ------------------------------------------------------------


def check_error(status: int, headers, data: bytes, anthropic: bool) -> dict:
    """An error body in the dialect, with a non-empty message; returns the error object."""
    assert headers["Content-Type"].startswith("application/json"), (status, data[:300])
    body = json.loads(data)
    if anthropic:
        assert body["type"] == "error" and set(body) <= {"type", "error", "request_id"}, body
        error = body["error"]
        assert set(error) == {"type", "message"}, body
        assert error["type"] == ANTHROPIC_ERROR_TYPES[status], (status, body)
    else:
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert isinstance(error["type"], str) and error["type"]
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
    assert isinstance(error["message"], str) and error["message"], body
    return error


def check_success(template: str, headers, data: bytes) -> None:
    """A 200 must be a real answer: generated text is always a prefix of the fake reply."""
    if headers["Content-Type"].startswith("text/event-stream"):
        events = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
        if template.startswith("/v1/messages"):
            datas = [json.loads(e) for e in events]
            assert datas[-1]["type"] == "message_stop", datas[-1]
            deltas = [d["delta"] for d in datas if d["type"] == "content_block_delta"]
            text = "".join(d.get("text", "") for d in deltas)
        else:
            assert events[-1] == "[DONE]", events[-1]
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                           if c["choices"][:1] and c["choices"][0]["index"] == 0)
        assert FAKE_REPLY.startswith(text), text
        return
    body = json.loads(data)
    if template == "/v1/messages":
        text = "".join(block["text"] for block in body["content"] if block["type"] == "text")
        assert FAKE_REPLY.startswith(text), body
    elif template.endswith("/completions"):
        assert all(FAKE_REPLY.startswith(c["message"]["content"] or "") for c in body["choices"]), body
    elif template.endswith("count_tokens"):
        assert body["input_tokens"] > 0
    elif template.startswith("/v1/agents"):
        assert body["agent_id"] and body["entry" if template.endswith("warm") else "entries"]
    else:
        assert body["model"] and isinstance(body["fingerprint"], str)


def send_checked(client: Client, template: str, req: Request) -> int:
    status, headers, data = client.send("POST", req.path, req.body, req.headers)
    assert status < 500, (status, req, data[:500])
    if status == 400 and "Content-Encoding" in req.headers and headers["Content-Type"].startswith("text/plain"):
        return status  # aiohttp's HTTP parser refused the encoding before any middleware ran
    if status >= 400:
        check_error(status, headers, data, req.anthropic)
    else:
        assert status == 200, (status, data[:300])
        check_success(template, headers, data)
    return status


def assert_daemon_answers(client: Client) -> None:
    """Both dialects still give the exact fake reply, and the daemon says it is ready."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    status, _, data = client.send("POST", "/v1/messages", json.dumps({**chat, "max_tokens": 64}).encode())
    assert status == 200 and json.loads(data)["content"][0]["text"] == FAKE_REPLY, data
    status, _, data = client.send("POST", "/v1/chat/completions", json.dumps(chat).encode())
    assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == FAKE_REPLY, data
    assert client.send("GET", "/health/ready")[0] == 200


# ---- the fuzz -------------------------------------------------------------------------------------

FUZZ = dict(deadline=None, database=None, print_blob=False,  # reproducible: a fixed seed, no example database
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCALES = [pytest.param(1, id="fast"), pytest.param(4, id="slow", marks=pytest.mark.slow)]


def test_every_post_route_has_a_dialect_and_a_budget(tokenizer, tmp_path):
    """The table covers every POST route of the app (a new route cannot be forgotten), its dialect
    matches the middleware's choice, and the budgets add up to at least 1,000 bodies."""
    app = make_app(Config(cache_dir=str(tmp_path / "cache"), admin_key=ADMIN_KEY), engine=FakeEngine(tokenizer))
    posts = {route.resource.canonical for route in app.router.routes() if route.method == "POST"}
    assert posts == set(ROUTES), f"POST routes without a fuzz dialect: {posts - set(ROUTES)}"
    for template, route in ROUTES.items():
        assert (route.dialect == ANTHROPIC) == template.startswith("/v1/messages"), template
    assert sum(route.examples for route in ROUTES.values()) >= 1000


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("template", list(ROUTES))
def test_hostile_bodies_never_get_a_5xx(daemon, template, scale):
    """Mutated, random, broken, oversized and deeply nested bodies: every answer is a 200 with a
    real reply or a 4xx in the route's dialect; the daemon still answers correctly afterwards.
    The slow variant sends four times as many, from another seed, and at least 1,000 to every route."""
    route = ROUTES[template]
    statuses = Counter()
    examples = route.examples if scale == 1 else max(1000, route.examples * scale)

    @seed(scale)
    @settings(max_examples=examples, **FUZZ)
    @given(req=hostile_requests(template))
    def fuzz(req):
        statuses[send_checked(daemon, template, req)] += 1
        SENT[template] += 1

    fuzz()
    assert sum(statuses.values()) >= examples
    assert statuses[400] > 0 and (statuses[200] > 0 or template.endswith("/evict")), statuses
    if route.admin:  # back to the first model, whatever the fuzz swapped in
        daemon.send("POST", template, b'{"model": "fake-model"}', {"x-api-key": ADMIN_KEY})
    assert_daemon_answers(daemon)


TOOL_BODIES = {  # the generation routes' bodies with a tool declared, called and answered
    "/v1/messages": {"model": "m", "max_tokens": 8, "tools": CLAUDE_TOOLS, "messages": CLAUDE_TOOL_TURNS},
    "/v1/chat/completions": {"model": "m", "max_tokens": 8, "tools": OPENAI_TOOLS, "messages": OPENAI_TOOL_TURNS,
                             "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}},
    "/v1/agents/{agent_id}/warm": {"model": "m", "tools": OPENAI_TOOLS, "messages": OPENAI_TOOL_TURNS},
}


def nested_schema(depth: int) -> str:
    """JSON text of a valid object schema nesting `depth` levels (a property's schema is two)."""
    pairs, odd = divmod(depth - 1, 2)
    inner = '{"type": "array", "items": {"type": "string"}}' if odd else '{"type": "string"}'
    return '{"type": "object", "properties": {"a": ' * pairs + inner + "}}" * pairs


@st.composite
def deep_requests(draw):
    """A tool body with one recursion point (tool schema, response format, tool_use input, call
    arguments as JSON text) nested around and far past the limit of 100 levels: (path, body, depth)."""
    template = draw(st.sampled_from(sorted(TOOL_BODIES)))
    doc = TOOL_BODIES[template]
    point = draw(st.sampled_from([p for p in paths_in(doc) if p and p[-1] in RECURSION_POINTS]))
    depth = draw(st.sampled_from([100, 101, 400, 2_000, 20_000, 100_000]))
    if point[-1] == "properties":  # the field is the schema holding them: one level more
        value = '{"a": ' + nested_schema(depth - 2) + "}"
    else:
        value = nested_schema(depth)
    text = point[-1] == "arguments"
    body = encode(set_at(doc, point, value if text else RAW), b"" if text else value.encode())
    return template.replace("{agent_id}", "fuzz-agent"), body, depth


@settings(max_examples=60, **FUZZ)
@given(req=deep_requests())
def test_deep_nesting_at_every_recursion_point_is_a_400_never_a_5xx(roomy_daemon, req):
    """Nesting past 100 levels where the server recurses on it (the chat template, json, the grammar
    compiler) is a 400 naming the field, whatever the route (or, deeper than the body's decoder
    goes, a 400 saying so); at 100 levels, an answer."""
    path, body, depth = req
    status, headers, data = roomy_daemon.send("POST", path, body, {"Content-Type": "application/json"})
    assert status < 500, (status, data[:300])
    if depth <= 100:
        assert status == 200, data[:300]
        return
    message = check_error(status, headers, data, path == "/v1/messages")["message"]
    assert status == 400 and ("nested more than 100 levels deep" in message
                              or depth >= 2_000 and "nested too deeply" in message), message


def test_at_least_1000_bodies_were_sent():
    """Counted, not assumed: the fuzz above (its fast half alone) sent >= 1,000 bodies across all
    POST routes."""
    if set(SENT) != set(ROUTES):
        pytest.skip(f"not every route's fuzz ran in this session ({sorted(SENT)})")
    assert sum(SENT.values()) >= 1000, SENT


# ---- extreme but well-formed requests: a 400 or an answer, quickly ---------------------------------

MSG = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
EXTREMES = {  # name: (path, body, the status it gets)
    "huge max_tokens": ("/v1/messages", {**MSG, "max_tokens": 10**30}, 200),
    "huge max_tokens (openai)": ("/v1/chat/completions", {**CHAT, "max_tokens": 10**30}, 200),
    "temperature 1e308": ("/v1/messages", {**MSG, "temperature": 1e308}, 400),
    "temperature 1e308 (openai)": ("/v1/chat/completions", {**CHAT, "temperature": 1e308}, 400),
    "top_p NaN": ("/v1/messages", {**MSG, "top_p": float("nan")}, 400),
    "top_p NaN (openai)": ("/v1/chat/completions", {**CHAT, "top_p": float("nan")}, 400),
    "n 10**9": ("/v1/chat/completions", {**CHAT, "n": 10**9}, 400),
    "seed 10**30": ("/v1/chat/completions", {**CHAT, "seed": 10**30}, 200),
    "10,000 stop sequences": ("/v1/messages", {**MSG, "stop_sequences": [f"never-{i}-" * 10 for i in range(10_000)]},
                              400),
    "1,000,000 stop sequences": ("/v1/messages", {**MSG, "stop_sequences": [f"s{i}" for i in range(10**6)]}, 400),
    "64 stops of 128 characters": ("/v1/messages", {**MSG, "stop_sequences": [f"{i:02}" * 64 for i in range(64)]},
                                   200),
    "64 stops of 128 characters (openai)": ("/v1/chat/completions", {**CHAT, "stop": [f"{i:02}" * 64 for i in range(64)]},
                                            200),
    "10,000 stops (openai)": ("/v1/chat/completions", {**CHAT, "stop": [f"never-{i}" for i in range(10_000)]}, 400),
    "100,000 messages": ("/v1/messages", {**MSG, "messages": [{"role": "user", "content": "hello " * 5}] * 100_000},
                         400),
    "100,000 turns": ("/v1/messages", {**MSG, "messages": [
        {"role": r, "content": "hi"} for _ in range(50_000) for r in ("user", "assistant")] + CHAT["messages"]}, 400),
    "100,000 system messages": ("/v1/messages", {**MSG, "messages": [{"role": "system", "content": "s"}] * 100_000
                                                 + CHAT["messages"]}, 400),
    "100,000 messages (openai)": ("/v1/chat/completions", {
        **CHAT, "messages": [{"role": "user", "content": "hello " * 5}] * 100_000}, 400),
    "a 30 MB prompt, n=16": ("/v1/chat/completions", {
        **CHAT, "n": 16, "messages": [{"role": "user", "content": "hello " * 5_000_000}]}, 400),
    "a 30 MB count_tokens": ("/v1/messages/count_tokens", {
        "model": "m", "messages": [{"role": "user", "content": "hello " * 5_000_000}]}, 400),
    **{f"{where} nested 900 deep": (path, json.dumps(doc).replace('"DEEP"', '{"a":' * 900 + "1" + "}" * 900).encode(),
                                    400) for where, path, doc in [
        ("tool_use input", "/v1/messages", {**MSG, "tools": CLAUDE_TOOLS, "messages": [
            USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "get_weather",
                                                     "input": "DEEP"}]}]}),
        ("input_schema", "/v1/messages", {**MSG, "tools": [{"name": "t", "input_schema": {
            "type": "object", "properties": "DEEP"}}]}),
        ("parameters", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
            "name": "t", "parameters": {"type": "object", "properties": "DEEP"}}}]}),
        ("response_format schema", "/v1/chat/completions", {**CHAT, "response_format": {
            "type": "json_schema", "json_schema": {"name": "r", "schema": "DEEP"}}})]},
    "arguments nested 1,000,000 deep": ("/v1/chat/completions", {**CHAT, "tools": OPENAI_TOOLS, "messages": [
        USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_weather", "arguments": "[" * 10**6 + "]" * 10**6}}]}]}, 400),
}


@pytest.mark.parametrize("name", list(EXTREMES))
def test_extreme_values_are_a_400_or_an_answer_quickly(roomy_daemon, name):
    """Huge numbers, NaN, 10,000 stop strings, 100,000-message lists: a 4xx in dialect or a real
    answer within seconds, while /health/live keeps answering."""
    path, doc, expected = EXTREMES[name]
    # NaN is written as the bare token NaN, which JSON does not have; nesting too deep for
    # json.dumps comes as bytes
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    assert len(body) < 32 << 20
    result = {}
    thread = threading.Thread(target=lambda: result.update(answer=send_raw_once(roomy_daemon, path, body)))
    start = time.perf_counter()
    thread.start()
    probe = Client(f"http://{roomy_daemon.host}:{roomy_daemon.port}")
    while thread.is_alive() and time.perf_counter() - start < 30:
        t = time.perf_counter()
        assert probe.send("GET", "/health/live")[0] == 200
        # decoding and listing 100,000 messages holds the loop ~0.3 s here, idle; 2 s allows a busy CI
        assert time.perf_counter() - t < 2.0, "the event loop froze"
        time.sleep(0.05)
    probe.close()
    thread.join(30)
    assert not thread.is_alive(), f"{name}: no answer in 30 s"
    status, headers, data = result["answer"]
    assert status == expected, (status, data[:300])
    if status >= 400:
        check_error(status, headers, data, path.startswith("/v1/messages"))
    else:
        check_success(path, headers, data)
    assert_daemon_answers(roomy_daemon)


def send_raw_once(daemon: Client, path: str, body: bytes):
    client = Client(f"http://{daemon.host}:{daemon.port}")
    try:
        return client.send("POST", path, body)
    finally:
        client.close()


# ---- regressions: each bug the fuzz found -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions", "/v1/agents/a/warm", "/admin/model"])
def test_invalid_utf8_in_a_string_is_a_400(daemon, path):
    """Bad UTF-8 inside a string was a 500 (msgspec 0.19 raised UnicodeDecodeError), and msgspec
    0.23 words it differently: the daemon says it in its own words, with the byte offset."""
    body = b'{"model": "m\xff", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}'
    status, headers, data = daemon.send("POST", path, body, {"x-api-key": ADMIN_KEY})
    assert status == 400
    message = check_error(status, headers, data, path == "/v1/messages")["message"]
    assert message == "the request body is not valid UTF-8: byte 12 cannot start or continue a character"


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions", "/v1/agents/a/warm", "/admin/model"])
@pytest.mark.parametrize("nest", ["unknown field", "cache_control"])
def test_deep_nesting_is_a_400(daemon, path, nest):
    """10,000 levels of [[[...]]] or {"a": {...}} hit msgspec's recursion limit (RecursionError),
    even in an ignored field: was a 500."""
    deep = "[" * 10_000 + "]" * 10_000
    deep_object = '{"a":' * 10_000 + "1" + "}" * 10_000
    content = f'[{{"type": "text", "text": "x", "cache_control": {deep_object}}}]' if nest == "cache_control" else '"x"'
    body = f'{{"model": "m", "extra": {deep if nest == "unknown field" else 1}, "max_tokens": 4,'
    body += f' "messages": [{{"role": "user", "content": {content}}}]}}'
    status, headers, data = daemon.send("POST", path, body.encode(), {"x-api-key": ADMIN_KEY})
    assert status == 400
    assert "nested too deeply" in check_error(status, headers, data, path == "/v1/messages")["message"]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions"])
def test_a_body_that_is_not_its_content_encoding_is_a_400(daemon, path):
    """Content-Encoding: gzip on a plain body made request.read() raise RequestPayloadError: a 500."""
    body = json.dumps(MSG).encode()
    status, headers, data = daemon.send("POST", path, body, {"Content-Encoding": "gzip"})
    assert status == 400
    error = check_error(status, headers, data, path == "/v1/messages")
    assert "could not be read" in error["message"] and "gzip" in error["message"]
    status, _, data = daemon.send("POST", path, gzip.compress(body), {"Content-Encoding": "gzip"})
    assert status == 200, data


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(status line and headers, body) of one Content-Length response read off a raw socket."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head, _, data = raw.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.startswith(b"content-length")))
    while len(data) < length:
        data += sock.recv(65536)
    return head, data


def test_a_truncated_deflate_body_is_refused_not_left_hanging(daemon):
    """aiohttp never ends request.read() on a truncated deflate body that arrives after its headers:
    the request hung. Bodies in any Content-Encoding but gzip are now refused unread."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: deflate\r\nContent-Length: 1\r\n\r\n"
    with socket.create_connection((daemon.host, daemon.port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(0.1)  # the body in a later packet, as a slow client sends it
        sock.sendall(b"1")
        head, data = read_response(sock)
    assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head, head
    assert "Content-Encoding 'deflate' is not supported" in check_error(
        400, {"Content-Type": "application/json"}, data, False)["message"]


def test_an_api_key_that_is_not_utf8_is_a_401(daemon):
    """aiohttp keeps non-UTF-8 header bytes as surrogates; the key comparison's .encode() raised: a 500."""
    body = json.dumps(MSG).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()
    with socket.create_connection((daemon.host, daemon.port), timeout=10) as sock:
        sock.sendall(head + b"x-api-key: k\xff\xfe\r\n\r\n" + body)
        head, data = read_response(sock)
    assert head.startswith(b"HTTP/1.1 401"), head
    error = check_error(401, {"Content-Type": "application/json"}, data, True)
    assert "not UTF-8" in error["message"]


def test_many_messages_of_one_role_merge_in_linear_time():
    """merge_turns joined a turn message by message (quadratic): 100,000 messages of 200 characters
    took 265 s; the turn is the messages joined by blank lines."""
    messages = [ChatMessage("user", "hello" * 40)] * 100_000 + [ChatMessage("assistant", "a")]
    start = time.perf_counter()
    merged = merge_turns(messages)
    assert time.perf_counter() - start < 5.0  # minutes when quadratic
    assert merged == [ChatMessage("user", "\n\n".join(["hello" * 40] * 100_000)), ChatMessage("assistant", "a")]


def test_many_leading_system_messages_are_checked_in_linear_time():
    """Leading system messages once rescanned every earlier message (quadratic); a later one is kept
    where it stands (Claude Code sends them mid-conversation)."""
    messages = [{"role": "system", "content": "s"}] * 100_000 + [{"role": "user", "content": "hi"}]
    body = msgspec.convert({"model": "m", "messages": messages}, CountTokensRequest)
    start = time.perf_counter()
    assert len(anthropic_chat_messages(body)) == 100_001
    assert time.perf_counter() - start < 5.0  # minutes when quadratic
    late = msgspec.convert({"model": "m", "messages": messages + messages[:1]}, CountTokensRequest)
    assert anthropic_chat_messages(late)[-1].role == "system"  # kept in place, not refused


class TestStopMatcherScale:
    def test_ten_thousand_stops_cost_well_under_a_millisecond_per_token(self):
        """Holding back text scanned every stop string at every length (16 ms a token for 10,000)."""
        stops = tuple(f"never-{i}-" * 10 for i in range(10_000)) + (" lazy dog",)
        matcher = StopMatcher(stops)
        words = FAKE_REPLY.replace(" ", " \x00").split("\x00")
        emitted, found = "", None
        start = time.perf_counter()
        for word in words:
            out, found = matcher.feed(word)
            emitted += out
            if found:
                break
        per_token = (time.perf_counter() - start) / len(words)
        assert (emitted, found) == ("The quick brown fox jumps over the", " lazy dog")
        assert per_token < 0.002, f"{per_token * 1000:.2f} ms per token"

    @settings(max_examples=300, derandomize=True, **FUZZ)
    @given(stops=st.lists(st.text("ab", min_size=1, max_size=5), min_size=1, max_size=6),
           chunks=st.lists(st.text("ab", max_size=4), max_size=8))
    def test_held_back_text_is_the_longest_stop_prefix(self, stops, chunks):
        """Against the definition: the text held back is the longest suffix of what was fed that
        starts a stop string; emitted plus held back is everything fed, up to the first match."""
        matcher = StopMatcher(tuple(stops))
        fed, emitted = "", ""
        for chunk in chunks:
            fed += chunk
            out, stop = matcher.feed(chunk)
            emitted += out
            if stop is not None:
                assert emitted == fed[: fed.find(stop)]
                return
            held = max((n for s in stops for n in range(1, len(s)) if fed.endswith(s[:n])), default=0)
            assert matcher.pending == fed[len(fed) - held:]
            assert emitted + matcher.pending == fed


class TestPlantedCacheFiles:
    """Agent cache files written by the cache's own writer, then given hypothesis-made header fields
    (metadata values and tensor table entries of any JSON type; the content hash resealed, so only
    the checks can refuse them): the cache opens on them without an error or a hang, and each file
    is quarantined, kept as another model's (a fingerprint changed to another string), or served as
    exactly the KV that was written."""

    FIELDS = ["key", "fingerprint", "tenant", "agent", "named", "num_tokens", "dtype", "encoding", "created",
              "last_use", "format"]
    plausible = st.sampled_from(["0", "1", "-1", "20", "2e9", "1e12", "nan", "inf", "1e999", "", "float16",
                                 "bfloat16", "float32", "native", "int8", "int4", "F16", "U8", "I32", "fp"])
    value = plausible | text | st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
        st.lists(st.integers(-2, 40), max_size=5), st.dictionaries(text, st.integers(), max_size=2))

    @settings(max_examples=100, derandomize=True, **FUZZ)
    @given(meta=st.dictionaries(st.sampled_from(FIELDS), value, max_size=3),
           table=st.lists(st.tuples(st.sampled_from(["tokens", "layers.0.keys", "layers.0.values"]),
                                    st.sampled_from(["dtype", "shape"]), value), max_size=2))
    def test_planted_header_fields_are_quarantined_or_served_exactly(self, meta, table):
        tokens = list(range(1000, 1020))
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            lock_dir(directory).close()
            written = store.EntryMeta("ab" * 8, "fp", "t", "agent-1", True, 20, "float32", "native", 1000.0, 1000.0)
            path = store.write(directory, written, fake_kv(tokens).to_tensors(np.asarray(tokens, np.int32))).path

            def edit(header):
                header["__metadata__"].update(meta)
                for name, field, value in table:
                    header[name][field] = value

            rewrite_header(path, edit)
            served, quarantined, foreign = asyncio.run(asyncio.wait_for(self.open_and_load(directory), 10.0))
        assert [served is not None, quarantined, foreign].count(True) == 1, (served, quarantined, foreign)
        if served is not None:
            entry, data = served
            assert all(isinstance(v, str) for v in (entry.key, entry.tenant, entry.agent, entry.dtype))
            assert isinstance(entry.named, bool) and entry.last_use <= time.time()
            assert entry.tokens.tolist() == tokens and data == fake_kv(tokens).layers[0][0].tobytes()

    @staticmethod
    async def open_and_load(directory):
        """(the entry and its keys' bytes, if it loads), whether a file was quarantined, whether one is
        kept as another model's."""
        cache = AgentCache(CacheLimits(min_prefix=4, ttl=1e10), directory)
        try:
            await cache.lock()
            await cache.open("fp", FAKE_LAYOUT)
            served = None
            for entry in list(cache.entries.values()):
                if await cache.fetch(entry):
                    served = entry, entry.data.layers[0][0].tobytes()
            await cache.settle()
            cache.check_integrity()
            return served, any((directory / "quarantine").iterdir()), bool(cache.foreign)
        finally:
            await cache.close()
