"""The daemon's life below HTTP: build the service from config, load and run, drain, close.

The HTTP layer binds the port, then runs `run(service)` in one background task; SIGTERM calls
`drain`, and the app's cleanup calls `close`, which writes what the cache holds only in memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from semcache.cache.cachedir import CacheDirLocked
from semcache.cache.index import AgentCache, CacheLimits
from semcache.engine.blas import BLAS_INFO, INSTALL_HINT, is_slow
from semcache.engine.types import Engine
from semcache.ops.config import Config
from semcache.ops.metrics import Metrics
from semcache.ops.ratelimit import RateLimiter
from semcache.scheduler.scheduler import Limits, Scheduler
from semcache.service.service import Service
from semcache.service.swap import settle_heap

log = logging.getLogger("semcache")
EXPIRE_EVERY = 600.0  # seconds between sweeps for cache entries past their TTL

# The stop budget. A SIGTERM is done within stop_seconds(drain_timeout, cache_close_timeout): the
# drain, then at most the graces below, then the cache's write-out (bounded by cache_close_timeout).
# The service files' stop timeouts (systemd TimeoutStopSec, launchd ExitTimeOut) allow STOP_MARGIN
# more than that for the defaults; tests/test_service_files.py holds them to it. aiohttp alone would
# wait 60 s for a slow handler, past them.
STEP_GRACE = 5.0  # after the drain timeout: for the engine step in progress to end
HANDLER_GRACE = 2.0  # then for handlers to write their last bytes
CLOSE_GRACE = 1.0  # aiohttp's shutdown_timeout: a handler still running gets it twice (to end, once cancelled)
STOP_MARGIN = 10.0  # what the service files allow beyond the longest stop


def stop_seconds(drain_timeout: float, cache_close_timeout: float = 10.0) -> float:
    """The longest a stop takes: the drain, the graces, and the cache's write-out (which gives up
    after `cache_close_timeout`). A service manager must allow more before it sends SIGKILL."""
    return drain_timeout + STEP_GRACE + HANDLER_GRACE + 2 * CLOSE_GRACE + cache_close_timeout


def build(config: Config, metrics: Metrics, limiter: RateLimiter | None, engine: Engine | None = None) -> Service:
    """The service and everything below it. Without `engine`, an MLXEngine on `config.model`
    (loaded by `run`, on its own thread)."""
    if engine is None:
        from semcache.engine.engine import MLXEngine

        max_draft = config.speculative_max_draft if config.speculative == "prompt_lookup" else 0
        engine = MLXEngine(config.model, prefill_chunk=config.prefill_chunk, max_draft=max_draft)
    limits = Limits.from_config(config)
    cache = make_cache(config, metrics) if config.cache_enabled else None
    return Service(config, engine, Scheduler(engine, limits, cache, metrics=metrics), cache, limiter)


def make_cache(config: Config, metrics: Metrics) -> AgentCache:
    return AgentCache(CacheLimits.from_config(config), Path(config.cache_dir).expanduser(), metrics)


async def run(service: Service) -> None:
    """Lock the cache folder, load the model, open the cache, then run the scheduler loop; it ends
    only by error (the daemon exits 1, having said why) or cancellation."""
    cache = service.cache
    if cache is not None:
        try:
            await cache.lock()  # before the model: a second daemon on this folder fails fast
        except CacheDirLocked as exc:
            log.error("%s", exc)
            raise
    await _load(service)
    try:
        if cache is not None:
            await cache.open(service.info.fingerprint, service.info.kv_layout)
        settle_heap()
        service.scheduler.open()
        log.info("ready")
        await asyncio.gather(service.scheduler.run(), _expire_loop(cache))
    except Exception:
        log.exception("the agent cache or the scheduler loop failed")
        raise


async def _load(service: Service) -> None:
    engine = service.engine
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
    seconds = service.load_seconds
    service.scheduler.metrics.model_load_seconds.set(seconds)
    service.scheduler.metrics.sample_process()
    log.info("model loaded in %.1f s: %s (%s, %.0f MB, %s on %s, context %d)", seconds, info.model_id,
             info.path, info.nbytes / 1e6, info.dtype, info.backend, info.context_length)


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


async def drain(service: Service, timeout: float) -> None:
    """Refuse queued and new requests (overloaded, Retry-After) and let running ones finish for up to
    `timeout` seconds; then end them with an error."""
    scheduler = service.scheduler
    service.start_draining()
    scheduler.refuse_waiting("the server is shutting down")
    log.info("draining: %d running, up to %.0f s", scheduler.num_running, timeout)
    try:
        await asyncio.wait_for(scheduler.wait_idle(), timeout)
    except asyncio.TimeoutError:
        log.warning("drain timeout: ending %d running requests", scheduler.num_running)
        scheduler.abort_running("the server shut down before the answer was finished")
        try:
            await asyncio.wait_for(scheduler.wait_idle(), STEP_GRACE)
        except asyncio.TimeoutError:  # a step that will not end: shut down around it
            log.error("the engine step did not finish; shutting down anyway")


async def close(service: Service) -> None:
    """Refuse new work, write the cache's memory-only entries to disk, free the model."""
    service.start_draining()
    await service.models.end()  # before the cache closes: a swap still loading stops, undone
    await service.turns.close()
    try:
        if service.cache is not None:
            start = time.perf_counter()
            await service.cache.close()  # memory entries not yet on disk are written now
            seconds = time.perf_counter() - start
            slow = seconds > service.config.cache_close_timeout / 2  # half its bound: a disk to look at
            (log.warning if slow else log.info)("agent cache written in %.1f s", seconds)
    finally:
        await service.engine.close()


