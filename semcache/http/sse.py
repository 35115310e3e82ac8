"""Server-sent events framing. Every Anthropic event carries an `event:` line (the SDK drops others)."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

_encode = msgspec.json.encode

DONE = b"data: [DONE]\n\n"


def frame(data: object, event: str | None = None) -> bytes:
    """One SSE event: optional `event:` line, one `data:` line of compact JSON, blank line."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + _encode(data) + b"\n\n"


async def open_stream(request: web.Request) -> web.StreamResponse:
    """Send 200 and SSE headers; after this, errors can only be reported as events."""
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    await response.prepare(request)
    return response


KEEPALIVE_SECONDS = 10.0  # a ping after this long without an event (clients cut idle streams)


class KeepAlive:
    """Writes to a stream, and writes `ping` itself whenever KEEPALIVE_SECONDS pass without an event:
    through a long prefill, a long queue of held-back tool-call text, or a slow step."""

    def __init__(self, response: web.StreamResponse, ping: bytes):
        self.response = response
        self.ping = ping
        self._lock = asyncio.Lock()  # one frame at a time: a ping never lands inside another event
        self._last = 0.0
        self._task: asyncio.Task | None = None

    async def write(self, data: bytes) -> None:
        async with self._lock:
            await self.response.write(data)
            self._last = asyncio.get_running_loop().time()

    async def __aenter__(self) -> "KeepAlive":
        self._last = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, ConnectionError):
            pass

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self._last + KEEPALIVE_SECONDS - loop.time()))
            if loop.time() - self._last >= KEEPALIVE_SECONDS:
                await self.write(self.ping)
