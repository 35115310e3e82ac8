"""Which API dialect a request speaks, decided in one place.

The anthropic SDK always sends `anthropic-version`; the openai SDK never does. Routes under
`/v1/messages` are Anthropic's whatever the headers say; shared routes (`/v1/models`, errors of any
route, the agents API) follow the header.
"""

from __future__ import annotations

from aiohttp import web

ANTHROPIC_VERSION = "anthropic-version"


def sends_anthropic_version(request: web.Request) -> bool:
    return ANTHROPIC_VERSION in request.headers


def is_anthropic(request: web.Request) -> bool:
    """Anthropic dialect for /v1/messages* or any request with an anthropic-version header."""
    return request.path.startswith("/v1/messages") or sends_anthropic_version(request)
