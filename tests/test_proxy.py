"""Scale-out behind nginx, run with the shipped config/nginx.conf: two real daemons, each with its own
cache folder, behind a consistent hash on the agent id. An agent's turns hit its cache through the
proxy; streams are not buffered; SIGTERM on one daemon moves its agents to the other with a cache
miss and no client-visible error.

The test substitutes only the lines the config marks `# [site]` (daemon addresses, the listen
port, pid/log/temp paths) and runs everything else as shipped.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from perf.faults.daemon import Daemon
from semcache.ops.config import Config
from tests.conftest import free_port

ROOT = Path(__file__).parent.parent
SHIPPED = ROOT / "config" / "nginx.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed: `make test` installs it as root, else run `sudo apt-get install nginx`")

TOPICS = ["astronomy", "baking", "canoeing", "dominoes", "embroidery", "falconry", "geology", "harmonica",
          "ikebana", "juggling", "knitting", "lacrosse", "mosaics", "navigation", "origami", "pottery"]
QUESTIONS = ["Give me one tip.", "And one more, please.", "Thank you. One last tip?", "Anything else?"]
MAX_TOKENS = 8
TIMEOUT = 60.0
STORY = {"model": "m", "temperature": 0,
         "messages": [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]}
# Foreground master; as root, workers run as root too (pytest's tmp folders are 0700 to others).
GLOBALS = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")


# The shipped config with its [site] lines filled in ------------------------------------------------------

SITE_LINE = re.compile(r"^(?P<indent>\s*)(?P<name>\w+)\s+(?P<arg>\S+?)(?P<rest>(\s[^;#]*)?);\s*# \[site\]")
SITE_PATHS = {"pid", "error_log", "access_log", "client_body_temp_path"}


def site_config(text: str, listen: str, servers: list[str], prefix: Path) -> str:
    """Config text with each `# [site]` line's first argument replaced: `server` lines take the daemon
    addresses in order, `listen` the test port, paths go under `prefix`. Every other line is kept."""
    out, used = [], {"server": 0, "listen": 0}
    for line in text.splitlines():
        m = SITE_LINE.match(line)
        if m is None:
            assert "[site]" not in line.split("#", 1)[0], f"a [site] marker this test cannot parse: {line!r}"
            out.append(line)
            continue
        name = m["name"]
        if name == "server":
            arg = servers[used["server"]]
        elif name == "listen":
            arg = listen
        else:
            assert name in SITE_PATHS, f"unexpected [site] directive {name!r}: teach site_config about it"
            arg = str(prefix / Path(m["arg"]).name)
        used[name] = used.get(name, 0) + 1
        out.append(f"{m['indent']}{name} {arg}{m['rest'] or ''};")
    assert used["server"] == len(servers) and used["listen"] == 1, f"[site] lines found: {used}"
    assert SITE_PATHS <= set(used), f"[site] paths missing: {SITE_PATHS - set(used)}"
    return "\n".join(out) + "\n"


def directive(text: str, name: str) -> str:
    """The arguments of the one `name` directive in the config (comments ignored)."""
    found = re.findall(rf"^\s*{name}\s+([^;]*);", text, re.MULTILINE)
    assert len(found) == 1, f"{name}: {found}"
    return found[0].strip()


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert m, value
    return int(m[1]) * units[m[2] or "s"]


class Nginx:
    """nginx (master in the foreground) running the shipped config with test [site] values; stop()
    always leaves no process behind."""

    def __init__(self, folder: Path, upstreams: list[str]):
        self.folder = folder
        self.upstreams = upstreams
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Nginx:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # other processes pick free ports too: a lost race to bind is retried
            port = free_port()
            conf = self.folder / "nginx.conf"
            conf.write_text(site_config(SHIPPED.read_text(), f"127.0.0.1:{port}", self.upstreams, self.folder))
            with open(self.folder / "stderr.log", "w") as err:
                self.proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(self.folder),
                                              "-g", GLOBALS], stdout=err, stderr=err)
            self.url = f"http://127.0.0.1:{port}"
            if self._wait_ours():
                return self
            self.stop()
        raise RuntimeError(f"nginx could not bind a free port in 3 tries:\n{self.errors()}")

    def _wait_ours(self) -> bool:
        """True once /health/live answers through nginx (Server: nginx, so it is not another server)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "Address already in use" in self.errors():
                    return False
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.errors()}")
            try:
                with urllib.request.urlopen(self.url + "/health/live", timeout=2) as r:
                    if r.headers.get("Server") == "nginx" and r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"nginx did not answer in time:\n{self.errors()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown: the master stops its workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def errors(self) -> str:
        return "".join(p.read_text(errors="replace")[-3000:] for p in
                       (self.folder / "stderr.log", self.folder / "semcache-error.log") if p.exists())

    def access_log(self) -> list[dict]:
        """The access log's lines as {status, upstream, upstream_status, agent}."""
        pattern = re.compile(r'" (?P<status>\d{3}) \d+ agent="(?P<agent>[^"]*)" upstream="(?P<upstream>[^"]*)" '
                             r'upstream_status="(?P<upstream_status>[^"]*)"')
        lines = (self.folder / "semcache-access.log").read_text().splitlines()
        return [m.groupdict() for m in map(pattern.search, lines) if m]


# Requests through the proxy ----------------------------------------------------------------------------


def post(url: str, body: dict, headers: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url} {headers}: HTTP {exc.code}: {exc.read()[:500]!r}") from None


def system_prompt(name: str, topic: str) -> str:
    """A ~150-token system prompt that differs from every other agent's from its first word: the
    tenant-wide prefix lookup finds nothing to share (fewer than cache_min_prefix tokens)."""
    return " ".join(f"{name} rule {k}: you are the {topic} assistant, and you answer questions "
                    f"about {topic} briefly, with one concrete example." for k in range(6))


class Agent:
    """One conversation; each turn sends the whole history (the agent's own reply included)."""

    def __init__(self, name: str, topic: str):
        self.name = name
        self.system = system_prompt(name, topic)
        self.messages: list[dict] = []

    def turn(self, proxy: str, header: str = "X-Agent-ID", dialect: str = "openai") -> int:
        """Take the next turn through the proxy; returns the prompt tokens served from cache."""
        self.messages.append({"role": "user", "content": QUESTIONS[len(self.messages) // 2]})
        common = {"model": "m", "max_tokens": MAX_TOKENS, "temperature": 0}
        if dialect == "openai":
            body = {**common, "messages": [{"role": "system", "content": self.system}, *self.messages]}
            r = post(proxy + "/v1/chat/completions", body, {header: self.name})
            text = r["choices"][0]["message"]["content"]
            cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
        else:
            body = {**common, "system": self.system, "messages": self.messages}
            r = post(proxy + "/v1/messages", body, {header: self.name, "anthropic-version": "2023-06-01"})
            text = "".join(block["text"] for block in r["content"] if block["type"] == "text")
            cached = r["usage"]["cache_read_input_tokens"]
        self.messages.append({"role": "assistant", "content": text or "."})
        return cached


def holders(daemons: list[Daemon], agent: str) -> list[int]:
    """Indices of the daemons with a cache entry for `agent`, once one has it (the entry is stored
    just after the answer is sent)."""
    deadline = time.monotonic() + 5
    while True:
        found = [i for i, d in enumerate(daemons)
                 if any(e["agent_id"] == agent for e in d.get_json("/v1/agents")["data"])]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def spread_agents(proxy: str, daemons: list[Daemon], name: str, enough, **turn) -> dict[int, list[Agent]]:
    """Agents take their first turn one by one until `enough(by_daemon)`; each lands on exactly one
    daemon (found from the daemons' /v1/agents, not predicted). Returns {daemon index: agents}."""
    by_daemon: dict[int, list[Agent]] = {i: [] for i in range(len(daemons))}
    for k, topic in enumerate(TOPICS):
        agent = Agent(f"{name}.{k}-{secrets.token_hex(3)}", topic)  # ids unlike each other, as real ones are
        assert agent.turn(proxy, **turn) == 0, f"{agent.name}: a first turn cannot be cached"
        found = holders(daemons, agent.name)
        assert len(found) == 1, f"{agent.name} has entries on daemons {found}, not exactly one"
        by_daemon[found[0]].append(agent)
        if enough(by_daemon):
            return by_daemon
    raise AssertionError(f"{len(TOPICS)} agents did not spread as needed: "
                         f"{ {i: [a.name for a in v] for i, v in by_daemon.items()} }")


@contextmanager
def cluster(folder: Path):
    """Two daemons (own cache folders, started together) behind nginx; all stopped on exit."""
    daemons = [Daemon(folder / f"cache-{i}", folder / f"daemon-{i}.log", SEMCACHE_CACHE_MIN_PREFIX="64")
               for i in range(2)]
    nginx = None
    try:
        errors: list[BaseException] = []
        threads = [threading.Thread(target=lambda d=d: _start(d, errors)) for d in daemons]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        nginx = Nginx(folder / "nginx", [f"127.0.0.1:{d.port}" for d in daemons]).start()
        yield nginx, daemons
    finally:
        if nginx is not None:
            nginx.stop()
        for d in daemons:
            d.stop()


def _start(daemon: Daemon, errors: list) -> None:
    try:
        daemon.start()
    except Exception as exc:  # noqa: BLE001 -- reported by the caller's thread
        errors.append(exc)


class Stream:
    """A streamed OpenAI chat completion read line by line in a thread, with arrival times."""

    def __init__(self, proxy: str, body: dict, headers: dict):
        self.started = threading.Event()  # the first content event arrived
        self.status = 0
        self.encoding = ""
        self.events: list[tuple[float, dict]] = []
        self.done = False
        self.error: BaseException | None = None
        self.start = time.perf_counter()
        self.end = 0.0
        self._args = (proxy, body, headers)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        proxy, body, headers = self._args
        req = urllib.request.Request(proxy + "/v1/chat/completions", json.dumps({**body, "stream": True}).encode(),
                                     {"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                self.status, self.encoding = r.status, r.headers.get("Content-Encoding", "")
                for line in r:
                    if line.startswith(b"data: [DONE]"):
                        self.done = True
                    elif line.startswith(b"data: "):
                        self.events.append((time.perf_counter(), json.loads(line[6:])))
                        self.started.set()
        except Exception as exc:  # noqa: BLE001 -- reported by the test's assertions
            self.error = exc
        finally:
            self.end = time.perf_counter()
            self.started.set()

    def join(self) -> Stream:
        self.thread.join(TIMEOUT + 5)
        assert not self.thread.is_alive(), "the stream did not finish in time"
        assert self.error is None, f"stream failed: {self.error!r}"
        errors = [e for _, e in self.events if "error" in e]
        assert self.status == 200 and self.done and not errors, (self.status, self.encoding, self.done, errors)
        return self

    @property
    def content_times(self) -> list[float]:
        return [t for t, e in self.events if any(c["delta"].get("content") for c in e.get("choices") or ())]


# The tests ----------------------------------------------------------------------------------------------


class TestShippedConfig:
    def test_config_is_valid_and_fits_semcache_defaults(self, tmp_path):
        """`nginx -t` accepts the shipped config; its limits fit semcache's defaults (body size, queue
        wait) and it retries only refusals (503, errors), with a bounded number of tries."""
        text = site_config(SHIPPED.read_text(), "127.0.0.1:1", ["127.0.0.1:2", "127.0.0.1:3"], tmp_path)
        (tmp_path / "nginx.conf").write_text(text)
        check = subprocess.run([NGINX, "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path),
                                "-g", GLOBALS], check=False, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        defaults = Config()
        assert directive(text, "hash") == "$semcache_agent consistent"
        assert directive(text, "client_max_body_size") == f"{defaults.max_body >> 20}m"
        assert directive(text, "proxy_buffering") == "off"
        assert directive(text, "proxy_next_upstream").split() == ["error", "timeout", "http_503", "non_idempotent"]
        assert 1 < int(directive(text, "proxy_next_upstream_tries")) <= 3
        retry_window = seconds(directive(text, "proxy_next_upstream_timeout"))
        read_timeout = seconds(directive(text, "proxy_read_timeout"))
        assert defaults.max_queue_wait < retry_window < read_timeout, (retry_window, read_timeout)
        assert read_timeout >= defaults.max_queue_wait + 300  # room to generate after the longest wait


    def test_access_log_holds_no_query_string_and_no_key(self):
        """The proxy's access log writes method and path without the query string (a client may put
        its key there), the tenant name of the purge route (a bare key names its tenant) masked, and
        no request header; X-Forwarded-For is appended for semcache's trusted_proxies."""
        text = SHIPPED.read_text()
        fmt = directive(text, "log_format")
        variables = set(re.findall(r"\$(\w+)", fmt))
        assert not variables & {"request", "request_uri", "args", "query_string", "is_args"}, variables
        assert not any(v.startswith(("http_", "arg_", "cookie_")) for v in variables), variables
        assert "$request_method $semcache_log_path" in fmt
        assert re.search(r'"~\^/admin/tenants/"\s+"/admin/tenants/-/agents";', text)
        assert re.search(r"proxy_set_header\s+X-Forwarded-For\s+\$proxy_add_x_forwarded_for;", text)

    def test_access_log_live(self, tokenizer, tmp_path):
        """Through the shipped config in front of one daemon (a fake engine): a key in the query
        string or in the purge route's tenant name never reaches nginx's access log."""
        from semcache.http.app import make_app
        from tests.conftest import FakeEngine, serve_in_thread

        config = Config(api_keys=["k"], admin_key="adm", cache_dir=str(tmp_path / "cache"))
        with serve_in_thread(make_app(config, engine=FakeEngine(tokenizer))) as url:
            daemon = url.removeprefix("http://")
            nginx = Nginx(tmp_path / "nginx", [daemon, daemon]).start()
            try:
                for method, path in (("GET", "/v1/models?api_key=SECRET-Q"),
                                     ("DELETE", "/admin/tenants/SECRET-T/agents")):
                    req = urllib.request.Request(nginx.url + path, method=method)
                    with pytest.raises(urllib.error.HTTPError) as refused:
                        urllib.request.urlopen(req, timeout=TIMEOUT)
                    assert refused.value.code == 401
            finally:
                nginx.stop()
        log = (tmp_path / "nginx" / "semcache-access.log").read_text()
        assert '"GET /v1/models HTTP/1.1" 401' in log and '"DELETE /admin/tenants/-/agents HTTP/1.1" 401' in log
        assert "SECRET" not in log


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One proxy and two daemons for the whole module (starting them is most of its time)."""
    with cluster(tmp_path_factory.mktemp("proxy")) as running:
        yield running


@pytest.fixture
def proxy(shared):
    """The shared cluster, with both daemons still running (TestFailover, last, stops one)."""
    _, daemons = shared
    assert all(d.proc.poll() is None for d in daemons), "a daemon of the shared cluster was stopped earlier"
    return shared


@pytest.mark.slow
@pytest.mark.model
class TestThroughProxy:
    def test_agent_turns_hit_the_daemon_that_holds_its_cache(self, proxy):
        """Agents spread over both daemons; each agent's entries live on one daemon only, and its
        later turns through the proxy reuse them (more each turn)."""
        nginx, daemons = proxy
        by_daemon = spread_agents(nginx.url, daemons, "turns",
                                  lambda b: all(b.values()) and sum(map(len, b.values())) >= 3)
        for index, agents in by_daemon.items():
            agent = agents[0]
            cached = [agent.turn(nginx.url), agent.turn(nginx.url)]
            assert 0 < cached[0] < cached[1], f"{agent.name} turns 2 and 3 cached {cached}"
            assert holders(daemons, agent.name) == [index], f"{agent.name} moved off daemon {index}"
        upstreams = {line["upstream"] for line in nginx.access_log()}
        assert upstreams == {f"127.0.0.1:{d.port}" for d in daemons}, upstreams  # no retries needed

    def test_stream_arrives_event_by_event(self, proxy):
        """A streamed answer is neither buffered nor compressed by the proxy (even for a client that
        accepts gzip): its tokens arrive spread over the generation, the first long before the last."""
        nginx, _ = proxy
        headers = {"X-Agent-ID": "proxy-streamer", "Accept-Encoding": "gzip, deflate"}  # as the SDKs (httpx) send
        stream = Stream(nginx.url, {**STORY, "max_tokens": 32}, headers).join()
        assert stream.encoding == "", f"a compressed stream is held back until a block fills: {stream.encoding}"
        times = stream.content_times
        total = stream.end - stream.start
        assert len(times) >= 16, f"only {len(times)} content events"
        spread = times[-1] - times[0]
        print(f"stream: {len(times)} content events over {spread:.2f} s of {total:.2f} s, "
              f"first after {times[0] - stream.start:.2f} s")
        assert spread > 0.5 * (stream.end - times[0]) and spread > 0.2, (spread, total)
        assert len({round(t, 3) for t in times}) >= len(times) // 2, "events arrived in bursts"

    def test_session_id_and_agent_path_route_like_agent_id(self, proxy):
        """X-Session-ID spreads agents over both daemons as X-Agent-ID does and reaches the same
        entry; /v1/agents/{id} (no header) reaches the daemon holding that agent."""
        nginx, daemons = proxy
        by_daemon = spread_agents(nginx.url, daemons, "session", lambda b: all(b.values()),
                                  header="X-Session-ID", dialect="anthropic")
        for agents in by_daemon.values():
            agent = agents[0]
            assert agent.turn(nginx.url, header="X-Agent-ID", dialect="anthropic") > 0, agent.name
            with urllib.request.urlopen(f"{nginx.url}/v1/agents/{agent.name}", timeout=10) as r:
                assert json.load(r)["agent_id"] == agent.name


@pytest.mark.slow
@pytest.mark.model
class TestFailover:  # stops a daemon of the shared cluster: keep it the module's last test
    def test_sigterm_moves_agents_to_the_other_daemon_without_errors(self, proxy):
        """SIGTERM on the daemon holding agents A and C while it streams for C: A's turn during the
        drain is answered by the other daemon (200, a miss), the stream finishes, A's next turn hits
        there and C's first turn after the exit is a miss there. nginx logs a retry and no failure."""
        nginx, daemons = proxy
        first = spread_agents(nginx.url, daemons, "failover", lambda b: any(len(v) >= 2 for v in b.values()))
        doomed = next(i for i, v in first.items() if len(v) >= 2)
        survivor = 1 - doomed
        a, c = first[doomed][:2]
        assert a.turn(nginx.url) > 0, "A's turn 2 should hit its daemon"

        # C's stream keeps the doomed daemon draining while A takes its turn
        stream = Stream(nginx.url, {**STORY, "max_tokens": 48}, {"X-Agent-ID": c.name})
        assert stream.started.wait(TIMEOUT), "the stream did not start"
        daemons[doomed].proc.send_signal(signal.SIGTERM)
        draining = daemons[doomed].proc.poll() is None and stream.thread.is_alive()
        assert draining, "the stream was over before the SIGTERM: no drain to test"
        assert a.turn(nginx.url) == 0, "A's turn during the drain should be a miss on the other daemon"
        stream.join()
        assert daemons[doomed].proc.wait(40) == 0, daemons[doomed].log_tail()

        assert a.turn(nginx.url) > 0, "A's next turn should hit on the survivor"
        assert holders(daemons[survivor:survivor + 1], a.name) == [0], "A's entry is not on the survivor"
        assert c.turn(nginx.url) == 0, "C's first turn after the stop should be a miss on the survivor"

        log = nginx.access_log()
        assert {line["status"] for line in log} == {"200"}, [line for line in log if line["status"] != "200"]
        addr = [f"127.0.0.1:{d.port}" for d in daemons]
        retried = [line for line in log if line["upstream"] == f"{addr[doomed]}, {addr[survivor]}"]
        print("retried:", retried)
        assert retried, "no request was retried from the stopped daemon to the other one"
