"""A recording reverse proxy between an agent client and semcache, on 127.0.0.1 in its own thread.

Each request is forwarded unchanged and recorded: when, route, status, the client's headers of
interest, the parsed body (for in-process analysis only: `structure()` is what may be written to
disk), and from the answer the usage, the time to first token and any error message.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from aiohttp import ClientSession, ClientTimeout, web

from perf.common import sse_event
from perf.servers import free_port

HEADERS = ("anthropic-beta", "anthropic-version", "user-agent", "x-app", "x-claude-code-session-id",
           "x-claude-code-agent-id", "x-claude-code-request-class", "x-claude-code-context-compacted")
_HOP = ("host", "content-length", "transfer-encoding", "content-encoding", "connection")


class Recorder:
    """`with Recorder(upstream) as rec:` gives `rec.base` to point a client at; `rec.records` fills."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.records: list[dict] = []
        self.label = ""  # what the client is doing now (a scenario and turn), copied into each record
        self.base = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Recorder":
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        port = free_port()
        started = threading.Event()

        async def start():
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", port).start()
            started.set()

        self._thread = threading.Thread(target=lambda: (self._loop.run_until_complete(start()),
                                                        self._loop.run_forever()), daemon=True)
        self._thread.start()
        assert started.wait(10), "the recording proxy did not start"
        self.base = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        record = {"t": time.time(), "label": self.label, "method": request.method, "path": request.path_qs,
                  "headers": {h: request.headers[h] for h in HEADERS if h in request.headers},
                  "body": json.loads(raw) if raw.strip() else None}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        start = time.perf_counter()
        async with ClientSession(timeout=ClientTimeout(total=1800)) as session:
            async with session.request(request.method, self.upstream + request.path_qs, data=raw,
                                       headers=headers) as upstream:
                response = web.StreamResponse(status=upstream.status, headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in _HOP})
                await response.prepare(request)
                body = bytearray()
                async for chunk in upstream.content.iter_any():
                    if b"content_block_delta" in chunk and "ttft_s" not in record:
                        record["ttft_s"] = time.perf_counter() - start
                    body += chunk
                    await response.write(chunk)
        record |= {"status": upstream.status, "seconds": time.perf_counter() - start} | parse_answer(bytes(body))
        self.records.append(record)
        await response.write_eof()
        return response


def parse_answer(raw: bytes) -> dict:
    """Usage and error message of a JSON or SSE answer (Anthropic dialect)."""
    if raw.lstrip().startswith(b"{"):
        data = json.loads(raw)
        if data.get("type") == "error":
            return {"error": data["error"]["message"]}
        return {"usage": data.get("usage"), "stop_reason": data.get("stop_reason")}
    usage, out = {}, {}
    for event in filter(None, map(sse_event, raw.split(b"\n"))):
        kind = event.get("type")
        if kind == "message_start":
            usage |= event["message"]["usage"]
        elif kind == "message_delta":
            usage |= event.get("usage") or {}
            out["stop_reason"] = event["delta"].get("stop_reason")
        elif kind == "error":
            out["error"] = event["error"]["message"]
    return out | {"usage": usage or None}


def prompt_tokens(usage: dict) -> int:
    """All input tokens of a request (read from cache, written to it, and the rest)."""
    return usage["input_tokens"] + usage.get("cache_read_input_tokens", 0) + usage.get("cache_creation_input_tokens", 0)
