"""The client commands (semcache.ops.cli): mocked answers with aioresponses, then against a live daemon."""

import argparse
import inspect
import json
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import aioresponses.core as aioresponses_core
import pytest
from aiohttp import ClientResponse
from aioresponses import aioresponses
from yarl import URL

from semcache.http.app import make_app
from semcache.ops.cli import add_commands, ago, human_bytes, run
from semcache.ops.config import Config
from tests.conftest import FakeEngine, free_port, serve_in_thread

URL_ = "http://daemon.test:8000"
REPO = Path(__file__).resolve().parent.parent
NOW = time.time()
ENTRY = {"agent_id": "agent-1", "entry_id": "0123456789abcdef", "tier": "memory", "tokens": 1234,
         "bytes": 43_100_000, "last_use": NOW - 300, "created": NOW - 600}
AGENT = {"agent_id": "agent-1", "tokens": 1234, "bytes": 43_100_000, "entries": [ENTRY]}
NOT_FOUND = {"error": {"message": "no cached entries for agent 'x'", "type": "invalid_request_error",
                       "param": None, "code": "not_found"}}
READY = {"status": "ok", "queue_depth": 0, "active": 2, "model": "fake-model"}


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse `argv` with a parser shaped like semcache's (`serve` plus add_commands)."""
    parser = argparse.ArgumentParser(prog="semcache")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    add_commands(sub)
    return parser.parse_args(argv)


def cli(*argv: str) -> int:
    """run() on `argv`, pointed at the mocked daemon unless it is `config check`."""
    return run(parse([*argv, "--url", URL_] if argv[0] != "config" else list(argv)))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No SEMCACHE_URL / _API_KEY / _ADMIN_KEY from the caller's shell leaks into a test."""
    for name in ("SEMCACHE_URL", "SEMCACHE_API_KEY", "SEMCACHE_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)


class CompatResponse(ClientResponse):
    """aioresponses 0.7.9 omits aiohttp 3.14's required `stream_writer` (pnuckowski/aioresponses#289)."""

    def __init__(self, *args, **kwargs):
        if "stream_writer" in inspect.signature(ClientResponse.__init__).parameters:
            kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


@pytest.fixture
def mocked(monkeypatch):
    """aioresponses, patched for aiohttp 3.14."""
    monkeypatch.setattr(aioresponses_core, "ClientResponse", CompatResponse)
    with aioresponses() as m:
        yield m


def sent_headers(m, method: str, url: str) -> dict:
    """The headers of the first request aioresponses saw for `method url`."""
    return m.requests[(method, URL(url))][0].kwargs["headers"]


class TestFormatting:
    def test_human_bytes(self):
        """Sizes use decimal units with one decimal and never print 1000.0 of a unit."""
        assert [human_bytes(n) for n in (0, 999, 1000, 43_100_000, 999_950, 2 * 10**9)] == \
            ["0 B", "999 B", "1.0 kB", "43.1 MB", "1.0 MB", "2.0 GB"]

    def test_ago(self):
        """Recent stamps are relative; older than a day is local time."""
        assert ago(NOW - 12, NOW) == "12s ago" and ago(NOW - 300, NOW) == "5m ago"
        assert ago(NOW - 7200, NOW) == "2h ago"
        assert ago(NOW - 3 * 86400, NOW) == time.strftime("%Y-%m-%d %H:%M", time.localtime(NOW - 3 * 86400))


class TestMocked:
    def test_agents_ls_table(self, mocked, capsys):
        """agents ls prints a header row and one aligned row per entry."""
        entry = {**ENTRY, "last_use": time.time() - 300}  # not NOW: the whole suite may take minutes
        second = {**entry, "agent_id": "b", "tier": "disk", "tokens": 5, "bytes": 512}
        mocked.get(URL_ + "/v1/agents", payload={"object": "list", "data": [entry, second]})
        assert cli("agents", "ls") == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["AGENT", "TIER", "TOKENS", "SIZE", "LAST", "USE"]
        assert lines[1].split() == ["agent-1", "memory", "1234", "43.1", "MB", "5m", "ago"]
        assert lines[2].split()[:5] == ["b", "disk", "5", "512", "B"]
        assert lines[0].index("TIER") == lines[1].index("memory") == lines[2].index("disk")

    def test_agents_ls_empty(self, mocked, capsys):
        """An empty cache says so instead of printing a bare header."""
        mocked.get(URL_ + "/v1/agents", payload={"object": "list", "data": []})
        assert cli("agents", "ls") == 0
        assert capsys.readouterr().out.strip() == "no cached agents"

    @pytest.mark.parametrize("argv, method, path, body", [
        (["agents", "ls"], "get", "/v1/agents", {"object": "list", "data": [ENTRY]}),
        (["agents", "show", "agent-1"], "get", "/v1/agents/agent-1", AGENT),
        (["agents", "rm", "agent-1"], "delete", "/v1/agents/agent-1",
         {"agent_id": "agent-1", "deleted": True, "entries": 1}),
        (["agents", "evict", "agent-1"], "post", "/v1/agents/agent-1/evict", AGENT),
        (["health"], "get", "/health/ready", READY),
        (["models"], "get", "/v1/models", {"object": "list", "data": [{"id": "fake-model"}]}),
    ])
    def test_json(self, mocked, capsys, argv, method, path, body):
        """--json prints the answer's JSON pretty with sorted keys, for every client command."""
        getattr(mocked, method)(URL_ + path, payload=body)
        assert cli(*argv, "--json") == 0
        out = capsys.readouterr().out
        assert json.loads(out) == body and out == json.dumps(body, indent=2, sort_keys=True) + "\n"

    def test_show_and_evict(self, mocked, capsys):
        """show and evict print the agent's totals, then its entries by entry id."""
        mocked.get(URL_ + "/v1/agents/agent-1", payload=AGENT)
        mocked.post(URL_ + "/v1/agents/agent-1/evict", payload={**AGENT, "entries": [{**ENTRY, "tier": "disk"}]})
        assert cli("agents", "show", "agent-1") == 0
        out = capsys.readouterr().out
        assert "agent    agent-1" in out and "43.1 MB" in out and "entries  1" in out
        assert "ENTRY" in out and "0123456789abcdef" in out
        assert cli("agents", "evict", "agent-1") == 0
        assert "disk" in capsys.readouterr().out

    def test_rm(self, mocked, capsys):
        """rm reports how many entries were deleted."""
        mocked.delete(URL_ + "/v1/agents/agent-1", payload={"agent_id": "agent-1", "deleted": True, "entries": 2})
        assert cli("agents", "rm", "agent-1") == 0
        assert capsys.readouterr().out.strip() == "deleted 2 entries of agent agent-1"

    def test_agent_id_is_quoted(self, mocked):
        """An id with URL-special characters is sent percent-encoded in the path."""
        mocked.get(URL_ + "/v1/agents/a%2Fb", payload=AGENT)
        assert cli("agents", "show", "a/b") == 0

    @pytest.mark.parametrize("verb, method", [("show", "get"), ("rm", "delete"), ("evict", "post")])
    def test_not_found(self, mocked, capsys, verb, method):
        """A 404 answer exits 1 with the daemon's message and the status on stderr."""
        getattr(mocked, method)(URL_ + "/v1/agents/x" + ("/evict" if verb == "evict" else ""),
                                status=404, payload=NOT_FOUND)
        assert cli("agents", verb, "x") == 1
        captured = capsys.readouterr()
        assert captured.err.strip() == "semcache: no cached entries for agent 'x' (404)"
        assert captured.out == ""

    def test_error_without_json_body(self, mocked, capsys):
        """A non-JSON error answer (a proxy, say) still exits 1 with its text."""
        mocked.get(URL_ + "/v1/models", status=502, body="Bad Gateway")
        assert cli("models") == 1
        assert capsys.readouterr().err.strip() == "semcache: Bad Gateway (502)"

    def test_health_ready(self, mocked, capsys):
        """health exits 0 and prints the status when the daemon is ready."""
        mocked.get(URL_ + "/health/ready", payload=READY)
        assert cli("health") == 0
        assert capsys.readouterr().out.strip() == "ok: model fake-model, 2 active, 0 queued"

    def test_health_without_counts(self, mocked, capsys):
        """Without a valid key (API keys configured) the daemon leaves the counts out: so does health."""
        mocked.get(URL_ + "/health/ready", payload={"status": "ok", "model": "fake-model"})
        assert cli("health") == 0
        assert capsys.readouterr().out.strip() == "ok: model fake-model"

    def test_health_503(self, mocked, capsys):
        """health exits 1 on 503 and still prints the status (starting, draining, queue_full)."""
        mocked.get(URL_ + "/health/ready", status=503, payload={**READY, "status": "starting", "model": None})
        assert cli("health") == 1
        assert capsys.readouterr().out.startswith("starting:")

    def test_health_probe(self, mocked):
        """--probe picks the health route."""
        mocked.get(URL_ + "/health/live", payload=READY)
        assert cli("health", "--probe", "live") == 0

    def test_models(self, mocked, capsys):
        """models prints one model id a line."""
        mocked.get(URL_ + "/v1/models", payload={"object": "list", "data": [{"id": "a"}, {"id": "b"}]})
        assert cli("models") == 0
        assert capsys.readouterr().out.splitlines() == ["a", "b"]

    def test_api_key_sent(self, mocked):
        """--api-key is sent as x-api-key; without one no key header is sent."""
        mocked.get(URL_ + "/v1/models", payload={"data": []}, repeat=True)
        assert cli("models", "--api-key", "sk-1") == 0
        assert cli("models") == 0
        calls = mocked.requests[("GET", URL(URL_ + "/v1/models"))]
        assert calls[0].kwargs["headers"] == {"x-api-key": "sk-1"} and calls[1].kwargs["headers"] == {}

    def test_env_url_and_key(self, mocked, monkeypatch):
        """SEMCACHE_URL and SEMCACHE_API_KEY are the defaults of --url and --api-key."""
        monkeypatch.setenv("SEMCACHE_URL", "http://env.test:9/")
        monkeypatch.setenv("SEMCACHE_API_KEY", "sk-env")
        mocked.get("http://env.test:9/v1/models", payload={"data": []})
        assert run(parse(["models"])) == 0
        assert sent_headers(mocked, "GET", "http://env.test:9/v1/models") == {"x-api-key": "sk-env"}

    def test_purge_sends_admin_key(self, mocked, capsys, monkeypatch):
        """purge calls the admin route with the admin key (flag or SEMCACHE_ADMIN_KEY), not the API key."""
        url = URL_ + "/admin/tenants/key-abc/agents"
        mocked.delete(url, payload={"tenant": "key-abc", "deleted": 3}, repeat=True)
        assert cli("agents", "purge", "--tenant", "key-abc", "--admin-key", "adm", "--api-key", "sk") == 0
        assert capsys.readouterr().out.strip() == "deleted 3 entries of tenant key-abc"
        monkeypatch.setenv("SEMCACHE_ADMIN_KEY", "adm-env")
        assert cli("agents", "purge", "--tenant", "key-abc") == 0
        calls = mocked.requests[("DELETE", URL(url))]
        assert [c.kwargs["headers"] for c in calls] == [{"x-api-key": "adm"}, {"x-api-key": "adm-env"}]

    def test_purge_needs_admin_key(self, capsys):
        """purge without an admin key is a usage error (2) and sends nothing."""
        assert cli("agents", "purge", "--tenant", "t") == 2
        assert "SEMCACHE_ADMIN_KEY" in capsys.readouterr().err

    def test_bad_url(self, capsys):
        """A URL without http(s):// is a usage error."""
        assert run(parse(["models", "--url", "localhost:8000"])) == 2
        assert "--url" in capsys.readouterr().err

    def test_timeout(self, mocked, capsys):
        """No answer within --timeout counts as unreachable (3)."""
        mocked.get(URL_ + "/v1/models", exception=TimeoutError())
        assert cli("models", "--timeout", "0.5") == 3
        assert "no answer within 0.5 s" in capsys.readouterr().err


def test_connection_refused(capsys):
    """Nothing listening on the port: exit 3 naming the URL."""
    url = f"http://127.0.0.1:{free_port()}"
    assert run(parse(["agents", "ls", "--url", url])) == 3
    assert capsys.readouterr().err.startswith(f"semcache: cannot reach {url}: ")


class TestConfigCheck:
    def test_valid(self, capsys):
        """The repo's example config is valid."""
        path = str(REPO / "config" / "semcache.toml")
        assert cli("config", "check", path) == 0
        assert capsys.readouterr().out.strip() == f"ok: {path}"

    def test_unknown_key(self, tmp_path, capsys):
        """An unknown key exits 2 and names the key on stderr."""
        path = tmp_path / "bad.toml"
        path.write_text('port = 8001\ncache_sise = "1GiB"\n')
        assert cli("config", "check", str(path)) == 2
        err = capsys.readouterr().err
        assert "cache_sise" in err and err.startswith("semcache: ")

    def test_environment_ignored(self, tmp_path, monkeypatch):
        """The check reads the file alone: a bad SEMCACHE_* variable does not fail it."""
        monkeypatch.setenv("SEMCACHE_NOT_A_KEY", "1")
        path = tmp_path / "ok.toml"
        path.write_text("port = 8001\n")
        assert cli("config", "check", str(path)) == 0

    def test_missing_file(self, tmp_path, capsys):
        """A file that cannot be read is a config error (2)."""
        assert cli("config", "check", str(tmp_path / "nope.toml")) == 2
        assert "cannot read config file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    """A live daemon on a fake engine that stores entries from 4 tokens on; yields its base URL."""
    config = Config(cache_dir=str(tmp_path_factory.mktemp("cache")), cache_min_prefix=4)
    with serve_in_thread(make_app(config, engine=FakeEngine(tokenizer))) as url:
        yield url


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> dict:
    """One blocking JSON request (the live daemon runs in another thread)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def cache_agent(url: str, agent: str) -> None:
    """One chat turn as `agent`, then wait until its entry is listed (stored a step after the answer)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Hello there, a long enough prompt"}],
            "max_tokens": 8}
    http("POST", url + "/v1/chat/completions", body, {"X-Agent-ID": agent})
    for _ in range(200):
        if any(e["agent_id"] == agent for e in http("GET", url + "/v1/agents")["data"]):
            return
        time.sleep(0.01)
    raise AssertionError(f"agent {agent} was not stored")


class TestLive:
    def test_agents_ls(self, live, capsys):
        """A cached agent shows up in agents ls, in the table and in --json."""
        cache_agent(live, "cli-ls")
        assert run(parse(["agents", "ls", "--url", live])) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cli-ls"))
        assert row.split()[1] == "memory"
        assert run(parse(["agents", "ls", "--url", live, "--json"])) == 0
        assert "cli-ls" in {e["agent_id"] for e in json.loads(capsys.readouterr().out)["data"]}

    def test_show_evict_rm(self, live, capsys):
        """show, evict (to disk), rm, then show again answers 404 → exit 1."""
        cache_agent(live, "cli-rm")
        assert run(parse(["agents", "show", "cli-rm", "--url", live])) == 0
        assert "agent    cli-rm" in capsys.readouterr().out
        assert run(parse(["agents", "evict", "cli-rm", "--url", live, "--json"])) == 0
        assert {e["tier"] for e in json.loads(capsys.readouterr().out)["entries"]} == {"disk"}
        assert run(parse(["agents", "rm", "cli-rm", "--url", live])) == 0
        assert capsys.readouterr().out.startswith("deleted ")
        assert run(parse(["agents", "show", "cli-rm", "--url", live])) == 1
        assert capsys.readouterr().err.strip() == "semcache: no cached entries for agent 'cli-rm' (404)"

    def test_health_and_models(self, live, capsys):
        """health is ready (0) and models lists the fake engine's model id."""
        assert run(parse(["health", "--url", live])) == 0
        assert capsys.readouterr().out.startswith("ok: model fake-model")
        assert run(parse(["models", "--url", live])) == 0
        assert capsys.readouterr().out.strip() == "fake-model"

    def test_purge_route_missing(self, live, capsys):
        """Until the admin route exists, purge gets the daemon's 404 and exits 1."""
        assert run(parse(["agents", "purge", "--tenant", "default", "--admin-key", "a", "--url", live])) == 1
        assert "(404)" in capsys.readouterr().err
