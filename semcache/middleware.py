"""Middlewares, outermost first: request id + access log → errors (dialect-shaped) → auth."""

from __future__ import annotations

import hmac
import logging
import secrets
import time

import msgspec
from aiohttp import web

from semcache.errors import ApiError, Kind, anthropic_body, openai_body, status_for
from semcache.identity import TENANT, tenant_of
from semcache.keys import CONFIG

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


def is_anthropic(request: web.Request) -> bool:
    """Anthropic dialect for /v1/messages* or any request with an anthropic-version header."""
    return request.path.startswith("/v1/messages") or "anthropic-version" in request.headers


def error_response(request: web.Request, err: ApiError) -> web.Response:
    anthropic = is_anthropic(request)
    body = anthropic_body(err, request.get(REQUEST_ID)) if anthropic else openai_body(err)
    response = web.Response(
        status=status_for(err.kind, anthropic),
        body=msgspec.json.encode(body),
        content_type="application/json",
    )
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(err.retry_after)
        response.headers["retry-after-ms"] = str(err.retry_after * 1000)
    if request.method == "POST" and err.kind is Kind.OVERLOADED:
        response.headers["x-should-retry"] = "true"
    return response


@web.middleware
async def request_context(request: web.Request, handler):
    """Outermost: a request id for every response (set at prepare, so SSE streams get it) and a log line."""
    request[REQUEST_ID] = "req_" + secrets.token_hex(12)
    start = time.perf_counter()
    status = 0
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        if not request.path.startswith("/health"):
            access.info(
                "%s %s %s %.1fms %s", request.method, request.path, status,
                (time.perf_counter() - start) * 1000, request[REQUEST_ID],
            )


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: both SDKs read the id from their own header name."""
    request_id = request.get(REQUEST_ID)
    if request_id:
        response.headers["request-id"] = request_id
        response.headers["x-request-id"] = request_id


@web.middleware
async def errors(request: web.Request, handler):
    """The one place that turns exceptions into the caller's dialect; 500 only for bugs."""
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
    except ConnectionResetError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(request, ApiError(Kind.INTERNAL, "internal server error"))


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"not found: {request.method} {request.path}"
    if exc.status == 405:
        return f"method {request.method} is not allowed on {request.path}"
    if exc.status == 413:
        limit = request.app[CONFIG].max_body
        return f"request body is larger than the {limit} byte limit (config max_body)"
    return exc.text or exc.reason


@web.middleware
async def auth(request: web.Request, handler):
    """With api_keys configured, every route but /health/* needs x-api-key or Authorization: Bearer."""
    keys = request.app[CONFIG].api_keys
    if not keys or request.path.startswith("/health/"):
        return await handler(request)
    given = request.headers.get("x-api-key")
    bearer = request.headers.get("Authorization", "")
    if given is None and bearer[:7].lower() == "bearer ":
        given = bearer[7:].strip()
    if given is None:
        raise ApiError(Kind.AUTHENTICATION, "missing API key: send x-api-key or Authorization: Bearer")
    ok = False
    for key in keys:  # compare with every key, so timing does not tell which one nearly matched
        ok |= hmac.compare_digest(given.encode(), key.encode())
    if not ok:
        raise ApiError(Kind.AUTHENTICATION, "invalid API key")
    request[TENANT] = tenant_of(given)  # cache entries are scoped to the key
    return await handler(request)
