"""Who may use which route: API keys (tenants), the admin key, the metrics key, and a throttle on
failed attempts per client address (ops/throttle.py)."""

from __future__ import annotations

import hmac
import math

from aiohttp import web

from semcache.http.appkeys import CONFIG, KEYRING, THROTTLE
from semcache.http.identity import ADMIN, KEY, TENANT
from semcache.http.middleware import is_open
from semcache.ops.errors import ApiError, Kind
from semcache.ops.tenants import key_id, tenant_id

# request key: the caller showed a valid key (tenant, admin or metrics), or no API keys are configured
KNOWN_CALLER = "known_caller"
ADMIN_TENANT = "\x00admin"  # no tenant can be named this (tenants.check_name refuses control characters)


def given_key(request: web.Request) -> str | None:
    """The key sent as x-api-key or Authorization: Bearer (both SDKs' ways); a 401 if it is not
    UTF-8 (aiohttp keeps such bytes as surrogates, which no key can match or even encode)."""
    given = request.headers.get("x-api-key")
    bearer = request.headers.get("Authorization", "")
    if given is None and bearer[:7].lower() == "bearer ":
        given = bearer[7:].strip()
    if given is not None and any("\udc80" <= c <= "\udcff" for c in given):
        raise ApiError(Kind.AUTHENTICATION, "invalid API key: the header is not UTF-8 text")
    return given


def _matches(given: str | None, secret: str | None) -> bool:
    return bool(secret and given and hmac.compare_digest(given.encode(), secret.encode()))


def _keyed(request: web.Request) -> bool:
    """Some key is configured, so a key sent is compared with it (and a wrong one is a failure)."""
    config = request.app[CONFIG]
    return bool(config.admin_key or config.metrics_key or request.app[KEYRING].enabled)


@web.middleware
async def auth(request: web.Request, handler):
    """/health/* is open (its counts only for a known caller); /admin/* needs the admin key (404
    without one configured); /metrics needs metrics_key when set; with API keys configured every
    other route (and /metrics unless metrics_public or metrics_key) needs one of them. The admin key
    is accepted everywhere. Every 401, and every 403 to a caller without a valid API key (a guess at
    the admin key through X-Priority), counts against the client's address; an address out of tries
    gets 429 before any key is compared."""
    throttle = request.app[THROTTLE]
    address = throttle.address(request.remote, request.headers.getall("X-Forwarded-For", ()))
    if is_open(request):
        request[KNOWN_CALLER] = _known_caller(request, address)
        return await handler(request)
    wait = throttle.wait(address) if _keyed(request) and _guarded(request) else 0.0
    if wait > 0:
        raise ApiError(Kind.RATE_LIMIT, f"too many failed authentications from this address; retry in "
                       f"{math.ceil(wait)}s", retry_after=wait)
    try:
        return await _authorize(request, handler)
    except ApiError as err:
        if err.kind is Kind.AUTHENTICATION or (err.kind is Kind.PERMISSION and request.get(KEY) is None):
            throttle.failed(address)
        raise


def _guarded(request: web.Request) -> bool:
    """This request has a key compared, so an address out of tries may not send it: /admin/*,
    /metrics under metrics_key, every route when API keys are configured, and a request asking for
    a priority (below the default it needs the admin key). Without API keys, an ordinary request
    (the SDKs send some key anyway) compares none and is never throttled."""
    config = request.app[CONFIG]
    if request.path.startswith("/admin/"):
        return bool(config.admin_key)
    if request.path == "/metrics" and config.metrics_key and not config.metrics_public:
        return True
    return request.app[KEYRING].enabled or "X-Priority" in request.headers


def _known_caller(request: web.Request, address: str) -> bool:
    """For /health/*: no API keys configured, or a valid key (checked only while the address has
    tries left, and a wrong one spends one, so health is no oracle for guessing keys)."""
    config, keys, throttle = request.app[CONFIG], request.app[KEYRING], request.app[THROTTLE]
    if not keys.enabled:
        return True
    try:
        given = given_key(request)
    except ApiError:
        given = None
    if given is None or throttle.wait(address) > 0:
        return False
    if _matches(given, config.admin_key) or _matches(given, config.metrics_key) or keys.tenant(given) is not None:
        return True
    throttle.failed(address)
    return False


async def _authorize(request: web.Request, handler):
    config = request.app[CONFIG]
    path = request.path
    keys = request.app[KEYRING]
    given = given_key(request) if _keyed(request) else None
    admin = _matches(given, config.admin_key)
    request[ADMIN] = admin
    if path.startswith("/admin/"):
        if not config.admin_key:
            raise web.HTTPNotFound()
        if not admin:
            raise ApiError(Kind.AUTHENTICATION, "admin routes need the admin key (x-api-key)")
        return await handler(request)
    if path == "/metrics" and config.metrics_key and not config.metrics_public:
        return await _metrics_only(request, handler, given, admin)
    if not keys.enabled or (path == "/metrics" and config.metrics_public):
        return await handler(request)
    if given is None:
        raise ApiError(Kind.AUTHENTICATION, "missing API key: send x-api-key or Authorization: Bearer")
    tenant = ADMIN_TENANT if admin else keys.tenant(given)
    if tenant is None:
        raise ApiError(Kind.AUTHENTICATION, "invalid API key")
    request[TENANT] = tenant_id(tenant)  # cache entries are scoped to the tenant
    request[KEY] = key_id(given)
    return await handler(request)


async def _metrics_only(request: web.Request, handler, given: str | None, admin: bool):
    """/metrics with metrics_key set: that key or the admin key (the operator sees all of it anyway);
    a tenant key is a 403, so no tenant reads another's traffic there."""
    if not (admin or _matches(given, request.app[CONFIG].metrics_key)):
        if given is not None and request.app[KEYRING].tenant(given) is not None:
            raise ApiError(Kind.PERMISSION, "/metrics needs the metrics key (metrics_key), not an API key")
        raise ApiError(Kind.AUTHENTICATION, "/metrics needs the metrics key (metrics_key)")
    request[KEY] = key_id(given)  # the scraper's own rate-limit buckets
    return await handler(request)
