"""make_app: routes, middleware order, and the engine/scheduler lifecycle in cleanup_ctx."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from semcache.http import admin, agents, anthropic, auth, middleware, openai, status
from semcache.http.dialect import sends_anthropic_version
from semcache.http.appkeys import CONFIG, INFLIGHT, KEYRING, LIMITER, METRICS, RECENT, SERVICE, THROTTLE, Inflight
from semcache.ops.config import Config
from semcache.ops.metrics import Metrics
from semcache.ops.ratelimit import RateLimiter, RateLimits
from semcache.ops.recent import Recent
from semcache.ops.tenants import KeyRing
from semcache.ops.throttle import AuthThrottle
from semcache.service import lifecycle
from semcache.service.service import Service

log = logging.getLogger("semcache")

# Loads the model, then runs the scheduler loop; it ends only by error or cancellation.
LOAD_TASK: web.AppKey[asyncio.Task] = web.AppKey("load_task")
# Set by `semcache serve` once the port is bound, so loading starts (and logs) after binding.
BOUND: web.AppKey[asyncio.Event] = web.AppKey("bound")


def make_app(config: Config, engine=None, clock=time.monotonic) -> web.Application:
    """The whole HTTP app. Without `engine`, an MLXEngine on `config.model` is loaded after start-up.
    `clock` drives the rate limiter and the failed-auth throttle (tests pass a fake one)."""
    app = web.Application(
        client_max_size=config.max_body,
        middlewares=[middleware.request_context, middleware.errors, auth.auth, middleware.rate_limit],
    )
    app[CONFIG] = config
    app[INFLIGHT] = Inflight()
    app[KEYRING] = KeyRing(config.api_keys, config.api_keys_file)
    app[THROTTLE] = AuthThrottle(config.trusted_proxies, clock)
    rates = RateLimits(config.rate_limit_rpm, config.rate_limit_tpm, config.rate_limit_global_rpm)
    app[LIMITER] = RateLimiter(rates, clock) if any((rates.rpm, rates.tpm, rates.global_rpm)) else None
    app[METRICS] = metrics = Metrics()
    app[RECENT] = Recent()
    app[SERVICE] = lifecycle.build(config, metrics, app[LIMITER], engine)
    app.on_response_prepare.append(middleware.add_request_id)
    app.cleanup_ctx.append(_engine_lifecycle)
    app.add_routes([
        web.get("/health/live", health_live),
        web.get("/health/startup", health_startup),
        web.get("/health/ready", health_ready),
        web.head("/", probe),
        web.head("/api/hello", probe),
        web.post("/v1/messages", anthropic.messages),
        web.post("/v1/messages/count_tokens", anthropic.count_tokens),
        web.post("/v1/chat/completions", openai.chat_completions),
        web.post("/chat/completions", openai.chat_completions),
        web.get("/v1/models", list_models),
        web.get("/v1/models/{model_id}", get_model),
        web.get("/models", list_models),
        web.get("/metrics", metrics_endpoint),
        *agents.routes(),
        *admin.routes(),
        *status.routes(),
    ])
    return app


async def _engine_lifecycle(app: web.Application):
    """Load the model and run the loop in one background task (the port is bound first); stop it at exit."""
    service = app[SERVICE]
    app[LOAD_TASK] = asyncio.create_task(_run_when_bound(app, service))
    yield
    task = app[LOAD_TASK]
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    await lifecycle.close(service)


async def _run_when_bound(app: web.Application, service: Service) -> None:
    if BOUND in app:
        await app[BOUND].wait()
    await lifecycle.run(service)


def _health(request: web.Request, ok: bool, reason: str) -> web.Response:
    """The status for anyone; the queue and active counts only for a caller the daemon knows."""
    service = request.app[SERVICE]
    body = {"status": "ok" if ok else reason, "model": service.model_id}
    if request.get(auth.KNOWN_CALLER):
        body.update(queue_depth=service.num_waiting, active=service.num_running)
    return web.json_response(body, status=200 if ok else 503)


async def health_live(request: web.Request) -> web.Response:
    return _health(request, True, "ok")


async def health_startup(request: web.Request) -> web.Response:
    return _health(request, request.app[SERVICE].loaded, "starting")


async def health_ready(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if not service.loaded:
        return _health(request, False, "starting")
    if service.draining:
        return _health(request, False, "draining")
    return _health(request, not service.queue_full, "queue_full")


async def probe(request: web.Request) -> web.Response:
    """A client's connectivity check: the daemon answers, whatever its state."""
    return web.Response(status=200)


async def list_models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.require_loaded()
    info = service.info
    if sends_anthropic_version(request):
        data = [anthropic.model_info(info.model_id, info.context_length)]
        return web.json_response(
            {"data": data, "has_more": False, "first_id": info.model_id, "last_id": info.model_id}
        )
    return web.json_response({"object": "list", "data": [openai.model_object(info.model_id)]})


async def get_model(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.require_loaded()
    info = service.info
    # The generation routes serve any model name with the one model loaded (clients pick names such
    # as "local" or a Claude id), so discovery answers for any name too, with the real window.
    model_id = request.match_info["model_id"]
    if sends_anthropic_version(request):
        return web.json_response(anthropic.model_info(model_id, info.context_length))
    return web.json_response(openai.model_object(model_id))


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})
