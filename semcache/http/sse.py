"""Server-sent events framing. Every Anthropic event carries an `event:` line (the SDK drops others)."""

from __future__ import annotations

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
