"""Typed application keys: every shared object lives under one of these, never in a global."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from semcache.ops.config import Config
    from semcache.ops.metrics import Metrics
    from semcache.ops.ratelimit import RateLimiter
    from semcache.ops.recent import Recent
    from semcache.ops.tenants import KeyRing
    from semcache.ops.throttle import AuthThrottle
    from semcache.service.service import Service

CONFIG: web.AppKey["Config"] = web.AppKey("config")
SERVICE: web.AppKey["Service"] = web.AppKey("service")
METRICS: web.AppKey["Metrics"] = web.AppKey("metrics")
KEYRING: web.AppKey["KeyRing"] = web.AppKey("keyring")
LIMITER: web.AppKey["RateLimiter | None"] = web.AppKey("limiter")
THROTTLE: web.AppKey["AuthThrottle"] = web.AppKey("auth_throttle")
RECENT: web.AppKey["Recent"] = web.AppKey("recent")  # the last generations, for GET /v1/status


class Inflight:
    """How many requests are being handled (a drain waits for their last bytes before shutting down)."""

    count = 0


INFLIGHT: web.AppKey[Inflight] = web.AppKey("inflight")
