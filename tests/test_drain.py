"""Graceful drain on a real daemon: SIGTERM lets a running stream finish, refuses new work, writes
the finished request's cache, and exits 0. And the stop's time budget, on a fake engine."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest

from semcache.__main__ import shut_down
from semcache.cache import entryfile as store
from semcache.http.app import make_app
from semcache.http.appkeys import INFLIGHT
from semcache.ops.config import Config
from semcache.service.lifecycle import stop_seconds
from tests.conftest import FakeEngine, free_port
from tests.test_server import request_head, serving

BODY = {"model": "m", "max_tokens": 48, "stream": True, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]}
HEADERS = {"content-type": "application/json", "anthropic-version": "2023-06-01", "X-Agent-ID": "drainer"}


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "daemon exited during start-up"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("daemon not ready")


def start(tmp_path, **env) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "SEMCACHE_CACHE_MIN_PREFIX": "4", **env}
    proc = subprocess.Popen([sys.executable, "-m", "semcache", "serve", "--port", str(port),
                             "--cache-dir", str(tmp_path / "cache")], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "w"))
    try:
        wait_ready(port, proc)
    except BaseException:  # never leave a daemon behind
        proc.kill()
        proc.wait()
        raise
    return proc, port


def open_stream(port: int, max_tokens: int):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/messages", body=json.dumps({**BODY, "max_tokens": max_tokens}), headers=HEADERS)
    response = conn.getresponse()
    assert response.status == 200
    while b"content_block_delta" not in response.readline():
        pass
    return response


@pytest.mark.slow
@pytest.mark.model
def test_drain_timeout_ends_running_streams_as_overloaded(tmp_path):
    """A stream still running when drain_timeout passes ends with an overloaded_error event; exit 0."""
    proc, port = start(tmp_path, SEMCACHE_DRAIN_TIMEOUT="1")
    try:
        response = open_stream(port, 400)
        proc.send_signal(signal.SIGTERM)
        rest = response.read().decode()
        assert "event: error" in rest and "overloaded_error" in rest and "message_stop" not in rest
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.model
def test_second_signal_exits_at_once(tmp_path):
    """SIGTERM starts a drain; a second SIGTERM ends the process immediately (exit 1)."""
    proc, port = start(tmp_path, SEMCACHE_DRAIN_TIMEOUT="60")
    try:
        response = open_stream(port, 400)  # keep it open: a closed client would end the drain early
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 1 and time.monotonic() - started < 5
        response.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.model
def test_sigterm_drains(tmp_path):
    """In-flight stream completes after SIGTERM; a new request on an open connection gets 503 with
    Retry-After; new connections are refused; exit 0; the finished request's cache is on disk."""
    port = free_port()
    env = {**os.environ, "SEMCACHE_DRAIN_TIMEOUT": "60", "SEMCACHE_CACHE_MIN_PREFIX": "4"}
    proc = subprocess.Popen([sys.executable, "-m", "semcache", "serve", "--port", str(port),
                             "--cache-dir", str(tmp_path / "cache")], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "w"))
    try:
        wait_ready(port, proc)
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # a keep-alive connection
        idle.request("GET", "/health/live")
        idle.getresponse().read()
        stream = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        stream.request("POST", "/v1/messages", body=json.dumps(BODY), headers=HEADERS)
        response = stream.getresponse()
        assert response.status == 200
        while b"content_block_delta" not in response.readline():
            pass
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        idle.request("POST", "/v1/messages", body=json.dumps({**BODY, "stream": False}),
                     headers={k: v for k, v in HEADERS.items() if k != "X-Agent-ID"})
        refused = idle.getresponse()
        assert refused.status == 503 and refused.getheader("Retry-After")  # going away: 503, both dialects
        assert json.loads(refused.read())["error"]["type"] == "overloaded_error"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        rest = response.read().decode()
        assert "event: message_stop" in rest and "event: error" not in rest
        assert proc.wait(60) == 0
        metas = [store.read_meta(p).meta for p in (tmp_path / "cache" / "entries").glob("*.safetensors")]
        assert any(m.agent == "drainer" for m in metas), (tmp_path / "log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def agents_on_disk(folder) -> set[str]:
    return {store.read_meta(p).meta.agent for p in (folder / "entries").glob("*.safetensors")}


class TestStopBudget:
    async def test_a_client_that_never_finishes_its_request_cannot_delay_the_stop(self, tokenizer, tmp_path):
        """The stop (drain, end what still runs, write the caches) with a handler that never ends
        on its own, waiting for a request body that stopped arriving: done within the stop budget
        less its write-out reserve (aiohttp alone would wait 60 s for that handler, past systemd's
        SIGKILL), and a finished answer whose KV was only in memory is on disk after it."""
        config = Config(drain_timeout=0.2, idle_timeout=600, cache_dir=str(tmp_path / "cache"),
                        cache_write_through=False, cache_min_prefix=4)
        app = make_app(config, engine=FakeEngine(tokenizer))
        async with serving(app, config) as (runner, site, port):
            async with aiohttp.ClientSession() as session:
                body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi there"}]}
                headers = {"anthropic-version": "2023-06-01", "X-Agent-ID": "finished"}
                async with session.post(f"http://127.0.0.1:{port}/v1/messages", json=body, headers=headers) as r:
                    assert r.status == 200
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_head("/v1/messages", 1000) + b"{")
            while app[INFLIGHT].count == 0:  # its handler is waiting for the rest of the body
                await asyncio.sleep(0.01)
            assert agents_on_disk(tmp_path / "cache") == set()  # memory only, so far
            start = time.monotonic()
            await asyncio.wait_for(shut_down(app, runner, site, config.drain_timeout), stop_seconds(0.2))
            assert time.monotonic() - start <= stop_seconds(config.drain_timeout, cache_close_timeout=0)
            writer.close()
        assert agents_on_disk(tmp_path / "cache") == {"finished"}
