"""Middlewares, outermost first: request id + access log + request metrics → errors (dialect-shaped)
→ auth (http/auth.py) → rate limit."""

from __future__ import annotations

import logging
import math
import secrets
import time

import msgspec
from aiohttp import web

from semcache.ops.errors import ApiError, Kind, anthropic_body, invalid, openai_body, status_for
from semcache.http.dialect import is_anthropic
from semcache.http.identity import DEFAULT_TENANT, NO_AGENT, TENANT, USAGE, cache_headers, rate_key
from semcache.http.appkeys import CONFIG, INFLIGHT, LIMITER, METRICS, RECENT
from semcache.ops.ratelimit import anthropic_headers, openai_headers
from semcache.ops.recent import Record
from semcache.service.service import charge

log = logging.getLogger("semcache.http")
access = logging.getLogger("semcache.access")

REQUEST_ID = "request_id"
_HTTP_KINDS = {
    401: Kind.AUTHENTICATION,
    403: Kind.PERMISSION,
    404: Kind.NOT_FOUND,
    405: Kind.METHOD_NOT_ALLOWED,
    413: Kind.TOO_LARGE,
    429: Kind.RATE_LIMIT,
}


def error_response(request: web.Request, err: ApiError) -> web.Response:
    anthropic = is_anthropic(request)
    body = anthropic_body(err, request.get(REQUEST_ID)) if anthropic else openai_body(err)
    response = web.Response(
        status=status_for(err.kind, anthropic),
        body=msgspec.json.encode(body),
        content_type="application/json",
    )
    if err.retry_after is not None:
        seconds = max(1, math.ceil(err.retry_after))  # whole seconds: clients parse an integer
        response.headers["Retry-After"] = str(seconds)
        response.headers["retry-after-ms"] = str(seconds * 1000)
    # The SDKs (and Claude Code) read this before their own status rules: retry capacity refusals,
    # rate limits and server errors, never a request that is wrong as sent.
    response.headers["x-should-retry"] = "true" if should_retry(response.status) else "false"
    return response


def should_retry(status: int) -> bool:
    return status == 429 or status >= 500  # 503 and 529 included


@web.middleware
async def request_context(request: web.Request, handler):
    """Outermost: a request id for every response (set at prepare, so SSE streams get it), the
    request counter and one access-log line, so 401s and 429s are counted and logged too."""
    request[REQUEST_ID] = "req_" + secrets.token_hex(12)
    start = time.perf_counter()
    status = 499  # the client went away before an answer
    inflight = request.app[INFLIGHT]
    inflight.count += 1
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        inflight.count -= 1
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS].requests.labels(route, str(status)).inc()
        if not request.path.startswith("/health"):
            seconds = time.perf_counter() - start
            fields = {"request_id": request[REQUEST_ID], "method": request.method, "route": route,
                      "status": status, "duration_ms": round(seconds * 1000, 1), **request.get(USAGE, {})}
            # the route template, not the path: a path may hold a tenant name that is a key
            access.info("%s %s %s %.1fms %s", request.method, route, status, seconds * 1000,
                        request[REQUEST_ID], extra={"fields": fields})
            if USAGE in request:
                _remember(request, fields)


def _remember(request: web.Request, fields: dict) -> None:
    """A generation's access-log fields, kept for GET /v1/status under the caller's tenant."""
    usage = {**fields, "agent": fields["agent"] or NO_AGENT}
    for name in ("request_id", "method"):
        del usage[name]
    request.app[RECENT].add(Record(time=time.time(), tenant=request.get(TENANT, DEFAULT_TENANT), **usage))


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: both SDKs read the id from their own header name; rate-limit
    headers (both dialects' names) go on every response of a limited key."""
    request_id = request.get(REQUEST_ID)
    response.headers.update(cache_headers(request))
    if request_id:
        response.headers["request-id"] = request_id
        response.headers["x-request-id"] = request_id
    limiter = request.app[LIMITER]
    if limiter is not None and not is_open(request):
        snap = limiter.snapshot(rate_key(request))
        headers = anthropic_headers(snap, time.time()) if is_anthropic(request) else openai_headers(snap)
        response.headers.update(headers)


# Start-up probes a client sends before its first request (Claude Code: HEAD on the base URL and on
# /api/hello); they reveal nothing, so like /health/* they need no key and are never rate limited.
PROBES = frozenset({"/", "/api/hello"})


# Read-only views a page polls every second: charging them would starve the key's own agents.
UNCHARGED = frozenset({"/v1/status"})
# The status page (http/status.py) holds no data: it asks for a key and sends it to /v1/status itself.
PAGES = frozenset({"/status"})


def is_open(request: web.Request) -> bool:
    if request.method in ("GET", "HEAD") and request.path in PAGES:
        return True
    return request.path.startswith("/health/") or (request.method == "HEAD" and request.path in PROBES)


@web.middleware
async def rate_limit(request: web.Request, handler):
    """Innermost: one request of rpm for every route but /health/*, before any work (rendering,
    tokenizing, grammars); generation routes are charged their tokens too, once the prompt is
    tokenized (Service.start), before they reach the queue."""
    limiter = request.app[LIMITER]
    if limiter is None or is_open(request) or request.path in UNCHARGED:
        return await handler(request)
    charge(limiter, rate_key(request), 0)
    return await handler(request)


@web.middleware
async def errors(request: web.Request, handler):
    """The one place that turns exceptions into the caller's dialect; 500 only for bugs."""
    refused = _refuse_encoding(request)
    if refused is not None:
        return refused
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(request, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _HTTP_KINDS.get(exc.status, Kind.INVALID_REQUEST)
        message = _http_message(request, exc)
        return error_response(request, ApiError(kind, message))
    except web.RequestPayloadError as exc:  # the body does not match its framing or Content-Encoding
        reason = getattr(exc.__cause__, "message", None) or str(exc)
        return error_response(request, invalid(f"the request body could not be read: {reason}"))
    except ConnectionResetError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(request, ApiError(Kind.INTERNAL, "internal server error"))


def _refuse_encoding(request: web.Request) -> web.Response | None:
    """A body in any Content-Encoding but gzip is refused unread, and the connection closed: aiohttp
    (3.14) never ends the read of a truncated deflate body, so the request would hang."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if not request.body_exists or encoding in ("identity", "gzip"):
        return None
    message = f"Content-Encoding {encoding!r} is not supported for request bodies; send identity or gzip"
    response = error_response(request, invalid(message))
    response.force_close()
    return response


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"not found: {request.method} {request.path}"
    if exc.status == 405:
        return f"method {request.method} is not allowed on {request.path}"
    if exc.status == 413:
        limit = request.app[CONFIG].max_body
        return f"request body is larger than the {limit} byte limit (config max_body)"
    return exc.text or exc.reason
