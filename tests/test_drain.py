"""Graceful drain on a real daemon: SIGTERM lets a running stream finish, refuses new work, writes
the finished request's cache, and exits 0."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from semcache.cache import entryfile as store
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.model]
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
