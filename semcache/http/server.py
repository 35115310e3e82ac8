"""The HTTP server around the app: aiohttp's runner with the daemon's timeouts, and the idle watch.

A connection is idle when the server waits on its client and no byte moves for `idle_timeout`
seconds: before or between requests (aiohttp's keep-alive timeout, set to the same), a request body
that stopped arriving, or an answer the client stopped reading (a write buffer that does not drain).
The watch closes those. Time the server spends working is never idle: a long prefill, a non-streamed
answer that takes minutes, a stream that sends a token or a ping every few seconds are never cut.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from semcache.ops.config import Config
from semcache.service import lifecycle

log = logging.getLogger("semcache.http")


class Runner(web.AppRunner):
    """aiohttp's runner as `semcache serve` runs it: a handler is cancelled when its client goes,
    a stop waits CLOSE_GRACE for handlers still running (the stop budget, service/lifecycle.py),
    and idle connections are closed after `idle_timeout`."""

    def __init__(self, app: web.Application, config: Config):
        super().__init__(app, handler_cancellation=True, access_log=None, shutdown_timeout=lifecycle.CLOSE_GRACE,
                         keepalive_timeout=config.idle_timeout)
        self.idle_timeout = config.idle_timeout
        self.watch: IdleWatch | None = None
        self._watching: asyncio.Task | None = None

    async def setup(self) -> None:
        await super().setup()
        self.watch = IdleWatch(self.server, self.idle_timeout)
        self._watching = asyncio.create_task(self.watch.run())

    async def cleanup(self) -> None:
        try:
            await super().cleanup()  # the watch goes on meanwhile: a stalled client ends sooner
        finally:
            if self._watching is not None:
                self._watching.cancel()


@dataclass
class _Seen:
    """What the watch saw of one connection at its last look."""

    since: float  # the last time it saw the connection not waiting on its client, or a byte move
    transport: Any = None
    buffered: int = 0  # bytes waiting to be sent
    request: Any = None
    received: int = 0  # bytes of that request's body received


class IdleWatch:
    """Looks at every connection a few times per `timeout` and aborts those idle for that long."""

    def __init__(self, server: web.Server, timeout: float):
        self.server, self.timeout = server, timeout
        self.closed = 0  # connections closed for idleness
        self._seen: dict[Any, _Seen] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 4))
            self.sweep(loop.time())

    def sweep(self, now: float) -> None:
        seen = {}
        for handler in self.server.connections:
            state = seen[handler] = self._seen.get(handler) or _Seen(now)
            state.transport = handler.transport or state.transport  # aiohttp forgets it when closing
            if state.transport is None or not self._stalled(handler, state):
                state.since = now
            elif now - state.since >= self.timeout:
                self._abort(handler, state)
        self._seen = seen

    def _stalled(self, handler: Any, state: _Seen) -> bool:
        """The connection waits on its client, and nothing moved since the last look."""
        buffered, state.buffered = state.buffered, state.transport.get_write_buffer_size()
        # aiohttp's own state, read defensively: if it is not there, nothing counts as stalled.
        in_request = getattr(handler, "_request_in_progress", True)
        if state.buffered and (handler.writing_paused or not in_request):
            return state.buffered >= buffered  # the handler writes nothing more; the client reads nothing
        request = getattr(handler, "_current_request", None)
        if not in_request or request is None or request.content.is_eof():
            return False  # the server is working, or between requests (aiohttp's keep-alive timeout)
        received = request.content.total_bytes
        moved = request is not state.request or received != state.received
        state.request, state.received = request, received
        return not moved  # its body stopped arriving

    def _abort(self, handler: Any, state: _Seen) -> None:
        self.closed += 1
        peer = state.transport.get_extra_info("peername")
        what = "reading its request" if state.buffered == 0 else "sending to it"
        log.info("closing the connection from %s: idle for %.0f s (%s)", peer, self.timeout, what)
        state.transport.abort()  # not close(): that would wait for the buffer to drain
