"""make_app: routes, middleware order, and the engine/scheduler lifecycle in cleanup_ctx."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from aiohttp import web

from semcache.http import admin, agents, anthropic, middleware, openai
from semcache.engine.blas import BLAS_INFO, INSTALL_HINT, is_slow
from semcache.ops.config import Config
from semcache.engine.engine import Engine
from semcache.ops.errors import ApiError, Kind
from semcache.http.appkeys import CONFIG, INFLIGHT, KEYRING, LIMITER, METRICS, SERVICE
from semcache.ops.ratelimit import RateLimiter, RateLimits
from semcache.ops.tenants import KeyRing
from semcache.cache.index import AgentCache, CacheLimits
from semcache.ops.metrics import Metrics
from semcache.scheduler.scheduler import Limits, Scheduler
from semcache.cache.entryfile import CacheDirLocked
from semcache.service.service import Service, settle_heap

log = logging.getLogger("semcache")

# Loads the model, then runs the scheduler loop; it ends only by error or cancellation.
LOAD_TASK: web.AppKey[asyncio.Task] = web.AppKey("load_task")
# Set by `semcache serve` once the port is bound, so loading starts (and logs) after binding.
BOUND: web.AppKey[asyncio.Event] = web.AppKey("bound")
EXPIRE_EVERY = 600.0  # seconds between sweeps for cache entries past their TTL


def make_app(config: Config, engine: Engine | None = None, clock=time.monotonic) -> web.Application:
    """The whole HTTP app. Without `engine`, an MLXEngine on `config.model` is loaded after start-up.
    `clock` drives the rate limiter (tests pass a fake one)."""
    app = web.Application(
        client_max_size=config.max_body,
        middlewares=[middleware.request_context, middleware.errors, middleware.auth, middleware.rate_limit],
    )
    app[CONFIG] = config
    app[INFLIGHT] = middleware.Inflight()
    app[KEYRING] = KeyRing(config.api_keys, config.api_keys_file)
    rates = RateLimits(config.rate_limit_rpm, config.rate_limit_tpm, config.rate_limit_global_rpm)
    app[LIMITER] = RateLimiter(rates, clock) if any((rates.rpm, rates.tpm, rates.global_rpm)) else None
    if engine is None:
        from semcache.engine.engine import MLXEngine

        engine = MLXEngine(config.model, prefill_chunk=config.prefill_chunk)
    limits = Limits(
        max_active=config.max_active,
        kv_budget=config.kv_budget,
        max_queue=config.max_queue,
        max_queue_wait=config.max_queue_wait,
        stream_buffer=config.stream_buffer,
        batch_wait=config.batch_wait,
    )
    app[METRICS] = metrics = Metrics()
    cache = make_cache(config, metrics) if config.cache_enabled else None
    app[SERVICE] = Service(config, engine, Scheduler(engine, limits, cache, metrics=metrics), cache,
                           app[LIMITER])
    app.on_response_prepare.append(middleware.add_request_id)
    app.cleanup_ctx.append(_engine_lifecycle)
    app.add_routes([
        web.get("/health/live", health_live),
        web.get("/health/startup", health_startup),
        web.get("/health/ready", health_ready),
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
    ])
    return app


def make_cache(config: Config, metrics: Metrics) -> AgentCache:
    limits = CacheLimits(
        memory_budget=config.cache_memory_budget,
        disk_budget=config.cache_disk_budget,
        ttl=config.cache_ttl,
        min_prefix=config.cache_min_prefix,
        encoding=config.cache_disk_encoding,
        write_through=config.cache_write_through,
    )
    return AgentCache(limits, Path(config.cache_dir).expanduser(), metrics)


async def _engine_lifecycle(app: web.Application):
    """Load the model and run the loop in one background task (the port is bound first); stop it at exit."""
    service = app[SERVICE]
    app[LOAD_TASK] = asyncio.create_task(_load_and_run(app, service))
    yield
    task = app[LOAD_TASK]
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    try:
        if service.cache is not None:
            await service.cache.close()  # memory entries not yet on disk are written now
    finally:
        await service.engine.close()


async def _load_and_run(app: web.Application, service: Service) -> None:
    if BOUND in app:
        await app[BOUND].wait()
    engine = service.engine
    if service.cache is not None:
        try:
            await service.cache.lock()  # before the model: a second daemon on this folder fails fast
        except CacheDirLocked as exc:
            log.error("%s", exc)
            raise
    log.info("model loading: %s", _describe_model(service.config.model))
    if is_slow(BLAS_INFO):
        log.warning("BLAS: %s; CPU inference will be ~30x slower. Install OpenBLAS: %s", BLAS_INFO, INSTALL_HINT)
    else:
        log.info("BLAS: %s", BLAS_INFO)
    try:
        await engine.load()
    except Exception as exc:  # the serve command awaits this task and exits non-zero
        log.error("model failed to load: %s", exc)
        raise
    info = engine.info
    app[METRICS].model_load_seconds.set(getattr(engine, "load_seconds", 0.0) or 0.0)
    app[METRICS].sample_process()
    log.info(
        "model loaded in %.1f s: %s (%s, %.0f MB, %s on %s, context %d)",
        getattr(engine, "load_seconds", 0.0) or 0.0, info.model_id, info.path,
        info.nbytes / 1e6, info.dtype, info.backend, info.context_length,
    )
    cache = service.cache
    try:
        if cache is not None:
            await cache.open(info.fingerprint)
        settle_heap()
        service.scheduler.ready = True
        log.info("ready")
        await asyncio.gather(service.scheduler.run(), _expire_loop(cache))
    except Exception:  # the daemon exits on it: say why
        log.exception("the agent cache or the scheduler loop failed")
        raise


async def _expire_loop(cache: AgentCache | None) -> None:
    while cache is not None:
        await asyncio.sleep(EXPIRE_EVERY)
        cache.expire()


def _describe_model(spec: str | None) -> str:
    from semcache.engine.models import ModelLoadError, describe

    try:
        return describe(spec)
    except ModelLoadError as exc:
        return f"{spec or 'embedded model'} ({exc})"


def _health(service: Service, ok: bool, reason: str) -> web.Response:
    scheduler = service.scheduler
    body = {
        "status": "ok" if ok else reason,
        "queue_depth": scheduler.num_waiting,
        "active": scheduler.num_running,
        "model": service.model_id,
    }
    return web.json_response(body, status=200 if ok else 503)


async def health_live(request: web.Request) -> web.Response:
    return _health(request.app[SERVICE], True, "ok")


async def health_startup(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return _health(service, service.loaded, "starting")


async def health_ready(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    scheduler = service.scheduler
    if not service.loaded:
        return _health(service, False, "starting")
    if scheduler.draining:
        return _health(service, False, "draining")
    return _health(service, not scheduler.queue_full, "queue_full")


async def list_models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.require_loaded()
    info = service.engine.info
    if "anthropic-version" in request.headers:
        data = [anthropic.model_info(info.model_id, info.context_length)]
        return web.json_response(
            {"data": data, "has_more": False, "first_id": info.model_id, "last_id": info.model_id}
        )
    return web.json_response({"object": "list", "data": [openai.model_object(info.model_id)]})


async def get_model(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.require_loaded()
    info = service.engine.info
    model_id = request.match_info["model_id"]
    if model_id != info.model_id:
        raise ApiError(Kind.NOT_FOUND, f"model '{model_id}' does not exist; this server serves '{info.model_id}'")
    if "anthropic-version" in request.headers:
        return web.json_response(anthropic.model_info(info.model_id, info.context_length))
    return web.json_response(openai.model_object(info.model_id))


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})
