"""GET /v1/status (JSON: the model, queue, cache tiers, agents and the last requests, scoped to the
caller's tenant; the admin key sees every tenant) and GET /status, the live page that polls it.

The page is one static file (status.html: its own script and styles, nothing fetched from
elsewhere). It holds no data, so it is served without a key; it sends the key it asks for in the
x-api-key header, never in a URL."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from aiohttp import web

from semcache.http.appkeys import RECENT, SERVICE
from semcache.http.identity import ADMIN, DEFAULT_TENANT, TENANT
from semcache.ops.errors import invalid

PAGE_PATH = "/status"
PAGE = Path(__file__).with_name("status.html")
DEFAULT_LIMIT, MAX_LIMIT = 50, 500


def routes() -> list[web.RouteDef]:
    return [web.get("/v1/status", status), web.get(PAGE_PATH, page)]


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise invalid(f"limit must be a whole number from 1 to {MAX_LIMIT} (got {raw[:40]!r})", param="limit")
    return int(raw)


async def status(request: web.Request) -> web.Response:
    limit = _limit(request)
    scope = None if request.get(ADMIN) else request.get(TENANT, DEFAULT_TENANT)
    recent = request.app[RECENT]
    body = {
        **request.app[SERVICE].status(scope),
        "scope": "all" if scope is None else "tenant",
        "requests": recent.last(limit, scope),
        "window": recent.summary(scope),
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})


@cache
def _page() -> bytes:
    return PAGE.read_bytes()


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_page(), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP,
                                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


# Only this origin: the page can fetch /v1/status and nothing else, and no other site can frame it.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
