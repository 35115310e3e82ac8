"""`semcache top` (semcache.ops.top): one frame rendered from a status body, then the real command
in a pseudo-terminal against a live daemon, refreshing as an agent's two turns miss and then hit."""

import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import time
import urllib.request

import pytest

from semcache.http.app import make_app
from semcache.ops.config import Config
from semcache.ops.top import COLOURS, LEAVE, render
from tests.conftest import FakeEngine, serve_in_thread
from tests.test_agents_api import SYSTEM

NOW = 1_800_000_000.0
WINDOW = {"seconds": 300, "requests": 2, "hit_rate": 0.5, "cached_token_rate": 0.4,
          "ttft_ms": {"p50": 12.0, "p95": 30.0}, "ttft_ms_warm": {"p50": 12.0, "p95": 12.0},
          "ttft_ms_cold": {"p50": 30.0, "p95": 30.0}}
BODY = {
    "model": {"id": "fake-model", "fingerprint": "abc"}, "uptime_seconds": 42.0, "queue_depth": 3, "active": 1,
    "tiers": {"memory": {"bytes": 500, "entries": 1, "budget": 1000}, "disk": {"bytes": 0, "entries": 0, "budget": 10}},
    "agents": [{"agent_id": "agent-7", "tier": "memory", "tokens": 120, "bytes": 500, "last_use": NOW - 5}],
    "requests": [
        {"time": NOW - 1, "agent": "agent-7", "route": "/v1/messages", "status": 200, "prompt_tokens": 130,
         "cached_tokens": 100, "output_tokens": 8, "cache": "memory", "ttft_ms": 12.0, "duration_ms": 20.0},
        {"time": NOW - 3, "agent": "agent-7", "route": "/v1/messages", "status": 200, "prompt_tokens": 120,
         "cached_tokens": 0, "output_tokens": 8, "cache": "miss", "ttft_ms": 30.0, "duration_ms": 40.0},
    ],
    "window": WINDOW,
}


class TestRender:
    def test_frame_shows_counts_bars_agents_and_requests(self):
        frame = render(BODY, width=120, height=40, now=NOW)
        assert "queued 3  active 1" in frame and "hit rate 50%" in frame and "p95 30ms" in frame
        memory = next(line for line in frame.splitlines() if line.startswith("memory"))
        filled = memory[memory.index("[") + 1:memory.index("]")]
        assert filled.count("#") == filled.count(".") > 0 and "500 B / 1.0 kB, 1 entries" in memory
        rows = [line for line in frame.splitlines() if line.startswith(("agent-7", "AGENT "))]
        assert len(rows) == 2 and "5s ago" in rows[1]
        cache = [line.split()[4] for line in frame.splitlines() if "/v1/messages" in line]
        assert cache == ["memory", "miss"] and "100/130" in frame

    def test_fits_the_terminal_and_colours_by_hit_type(self):
        small = render(BODY, width=30, height=8, now=NOW)
        assert len(small.splitlines()) <= 7 and max(len(line) for line in small.splitlines()) <= 30
        coloured = render(BODY, width=120, height=40, color=True, now=NOW)
        lines = coloured.splitlines()
        assert any(line.startswith(COLOURS["memory"]) and "100/130" in line for line in lines)
        assert any(line.startswith(COLOURS["miss"]) and "0/120" in line for line in lines)


@pytest.fixture(scope="module")
def daemon(tokenizer, tmp_path_factory):
    config = Config(cache_dir=str(tmp_path_factory.mktemp("cache")), cache_min_prefix=16, api_keys=["top-key"])
    with serve_in_thread(make_app(config, engine=FakeEngine(tokenizer))) as url:
        yield url


def turn(url: str, messages: list[dict]) -> str:
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "system", "content": SYSTEM}, *messages]}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "x-api-key": "top-key",
                                              "X-Agent-ID": "tty-agent"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


class Terminal:
    """`semcache top` on a 120x40 pseudo-terminal; `until` reads its screen output."""

    def __init__(self, *args: str):
        import fcntl
        import termios

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm"}
        self.proc = subprocess.Popen([sys.executable, "-m", "semcache", "top", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, close_fds=True, start_new_session=True)
        os.close(slave)
        self.seen = ""

    def until(self, *texts: str, timeout: float = 30.0) -> str:
        """Read until the latest whole frame (one the next frame's start follows, so that no read cut
        it short) holds every text; returns that frame."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frames = self.seen.split("\x1b[H\x1b[2J")
            frame = frames[-2] if len(frames) > 2 else ""
            if all(t in frame for t in texts):
                return frame
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    break
        raise AssertionError(f"never saw {texts!r}; last output: {self.seen[-2000:]!r}")

    def close(self) -> int | None:
        """Read everything it writes until it exits (a full terminal buffer would block its last frame,
        and with it the `q` it has not read yet), then close the terminal."""
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                if select.select([self.master], [], [], 0.2)[0]:
                    chunk = os.read(self.master, 65536)
                    if chunk:
                        self.seen += chunk.decode(errors="replace")
                        continue
                if self.proc.poll() is not None and not select.select([self.master], [], [], 0.2)[0]:
                    return self.proc.returncode
            return self.proc.poll()
        except OSError:  # EIO: the child's side is closed and everything was read
            return self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            os.close(self.master)


def test_top_refreshes_in_a_terminal_and_quits_on_q(daemon):
    term = Terminal("--url", daemon, "--api-key", "top-key", "--interval", "0.2")
    try:
        term.until("semcache", "queued 0", "no cached agents")
        reply = turn(daemon, [{"role": "user", "content": "Hi"}])
        frame = term.until("tty-agent", "miss")
        assert "\x1b[?1049h" in term.seen  # the alternate screen, as htop uses
        turn(daemon, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply},
                      {"role": "user", "content": "More"}])
        frame = term.until("memory", "hit rate 50%")
        assert COLOURS["memory"] in frame and COLOURS["miss"] in frame
        os.write(term.master, b"q")
        assert term.close() == 0
        assert term.seen.endswith(LEAVE)  # the terminal given back
    finally:
        if term.proc.poll() is None:
            term.close()


def test_a_wrong_key_exits_1_with_the_reason(daemon):
    out = subprocess.run([sys.executable, "-m", "semcache", "top", "--url", daemon, "--api-key", "nope", "--once"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "invalid API key" in out.stderr
