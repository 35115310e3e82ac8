"""The server `semcache serve` runs (http/server.py): connections idle on the client's side are closed
after idle_timeout; time the server spends answering, however long, is never cut."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from contextlib import asynccontextmanager

from aiohttp import web

from semcache.http.app import make_app
from semcache.http.server import Runner
from semcache.ops.config import Config
from tests.conftest import FakeEngine, wait_ready

IDLE = 0.5
ANTHROPIC = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
MSG = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}


@asynccontextmanager
async def serving(app: web.Application, config: Config):
    """`app` behind the daemon's Runner on a free loopback port: (runner, site, port)."""
    runner = Runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        await wait_ready(app)
        yield runner, site, site._server.sockets[0].getsockname()[1]
    finally:
        if runner.server is not None:  # not stopped by the test itself
            await runner.cleanup()


def request_head(path: str, body_length: int) -> bytes:
    headers = "".join(f"{k}: {v}\r\n" for k, v in ANTHROPIC.items())
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {body_length}\r\n\r\n".encode()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection, which must be within `seconds`."""
    data = b""
    async with asyncio.timeout(seconds):
        while chunk := await reader.read(65536):
            data += chunk
    return data


class TestIdleConnections:
    async def test_a_request_body_that_stops_arriving_is_closed(self, tokenizer, tmp_path):
        """A client that sends part of its body, then nothing, is disconnected after idle_timeout."""
        config = Config(idle_timeout=IDLE, cache_dir=str(tmp_path))
        async with serving(make_app(config, engine=FakeEngine(tokenizer)), config) as (runner, _, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_head("/v1/messages", 1000) + b'{"model": "m",')
            start = time.monotonic()
            assert await closed_within(reader, 10 * IDLE) == b""
            assert IDLE <= time.monotonic() - start and runner.watch.closed == 1
            writer.close()

    async def test_a_slow_body_that_keeps_moving_is_answered(self, tokenizer, tmp_path):
        """A body sent a few bytes at a time, over three idle timeouts in all, is read and answered."""
        config = Config(idle_timeout=IDLE, cache_dir=str(tmp_path))
        async with serving(make_app(config, engine=FakeEngine(tokenizer)), config) as (runner, _, port):
            body = json.dumps(MSG).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_head("/v1/messages", len(body)))
            pieces = [body[i:i + len(body) // 8 + 1] for i in range(0, len(body), len(body) // 8 + 1)]
            for piece in pieces:
                await asyncio.sleep(3 * IDLE / len(pieces))
                writer.write(piece)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200") and runner.watch.closed == 0
            writer.close()

    async def test_a_client_that_stops_reading_is_closed(self, tokenizer, tmp_path):
        """An answer the client stops reading (its buffers full, the server's write waiting) ends
        after idle_timeout: the handler is cancelled, the connection aborted."""
        config = Config(idle_timeout=IDLE, cache_dir=str(tmp_path))
        app = make_app(config, engine=FakeEngine(tokenizer))
        ended = asyncio.Event()

        async def flood(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            try:
                for _ in range(4096):  # 256 MiB at most: far more than the socket buffers hold
                    await response.write(b"x" * 65536)
            finally:
                ended.set()
            return response

        app.router.add_get("/flood", flood)
        async with serving(app, config) as (runner, _, port):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
            await asyncio.wait_for(ended.wait(), 10 * IDLE + 5)
            assert runner.watch.closed == 1
            sock.close()

    async def test_long_answers_are_never_cut(self, tokenizer, tmp_path):
        """A non-streamed answer that takes three idle timeouts to compute (no byte moves meanwhile)
        and a stream of the same length are both answered in full."""
        config = Config(idle_timeout=IDLE, cache_dir=str(tmp_path))
        engine = FakeEngine(tokenizer, step_delay=3 * IDLE / 12)  # 11 tokens and EOS
        async with serving(make_app(config, engine=engine), config) as (runner, _, port):
            for stream in (False, True):
                body = json.dumps({**MSG, "stream": stream}).encode()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request_head("/v1/messages", len(body)) + body)
                start = time.monotonic()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                rest = await asyncio.wait_for(reader.readuntil(b"message_stop" if stream else b"end_turn"), 10)
                assert head.startswith(b"HTTP/1.1 200") and rest
                assert time.monotonic() - start >= 2 * IDLE
                writer.close()
            assert runner.watch.closed == 0

    async def test_a_connection_that_sends_no_request_is_closed(self, tokenizer, tmp_path):
        """An open connection with no request on it (keep-alive) is closed after idle_timeout."""
        config = Config(idle_timeout=IDLE, cache_dir=str(tmp_path))
        async with serving(make_app(config, engine=FakeEngine(tokenizer)), config) as (_, _, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            start = time.monotonic()
            assert await closed_within(reader, 10 * IDLE) == b""
            assert time.monotonic() - start >= IDLE * 0.9
            writer.close()
