"""Command line: `semcache serve [--host] [--port] [--model] [--cache-dir] [--config]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from semcache import __version__

from semcache.ops import cli, logs, top
from semcache.ops.config import Config, ConfigError, load_config

log = logging.getLogger("semcache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semcache", description="Local LLM server for agents.")
    parser.add_argument("--version", action="version", version=f"semcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP daemon")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")
    serve.add_argument("--model", help="GGUF file, mlx-lm folder or HF repo id (default: embedded SmolLM2)")
    serve.add_argument("--cache-dir", dest="cache_dir", help="KV cache folder (default ~/.cache/semcache)")
    serve.add_argument("--config", help="TOML config file (or SEMCACHE_CONFIG)")
    serve.add_argument("--log-level", dest="log_level", help="debug, info, warning or error")
    serve.add_argument("--allow-unauthenticated", dest="allow_unauthenticated", action="store_const", const=True,
                       help="allow binding a non-loopback address without API keys")
    cli.add_commands(sub)
    top.add_command(sub)
    return parser


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_exposure(config: Config) -> str | None:
    """An error when the daemon would listen beyond this machine with no API keys, unless allowed."""
    keyed = bool(config.api_keys or config.api_keys_file)
    if keyed or config.host in LOOPBACK or config.allow_unauthenticated:
        return None
    return (f"refusing to listen on {config.host} without API keys: set api_keys / api_keys_file, "
            "or pass --allow-unauthenticated")


def check_auth(config: Config) -> str | None:
    """An error when keys are configured but none would be in force (auth would be off), or a key
    setting is malformed."""
    from semcache.ops.tenants import KeyRing
    from semcache.ops.throttle import parse_networks

    try:
        KeyRing(config.api_keys, config.api_keys_file)
        parse_networks(config.trusted_proxies)
    except (OSError, ValueError) as exc:
        return str(exc)
    if config.metrics_key == "":
        return "metrics_key is empty: unset it or give the scraper's key"
    if config.metrics_key and config.metrics_public:
        return "metrics_key and metrics_public = true contradict each other: set one of them"
    return None


async def serve(config: Config) -> int:
    """Bind first, then load the model in the background; exit 0 on SIGTERM/SIGINT, 1 if loading fails."""
    from aiohttp import web

    from semcache.http.app import BOUND, LOAD_TASK, make_app
    from semcache.http.appkeys import KEYRING
    from semcache.http.server import Runner

    app = make_app(config)
    app[BOUND] = asyncio.Event()
    runner = Runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=config.backlog, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot bind %s:%s: %s", config.host, config.port, exc)
        await runner.cleanup()
        return 1
    bound = [s.getsockname() for s in site._server.sockets if s.family in (socket.AF_INET, socket.AF_INET6)]
    log.info("port bound: %s", ", ".join(f"{a[0]}:{a[1]}" for a in bound))
    if not app[KEYRING].enabled:
        log.warning("no API keys configured: anyone who can reach %s:%s can use this daemon", config.host, config.port)
    app[BOUND].set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        if stop.is_set():  # a second signal: no more waiting
            log.warning("second signal: exiting now")
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload_keys(app))
    stopping = asyncio.create_task(stop.wait())
    load = app[LOAD_TASK]
    await asyncio.wait([stopping, load], return_when=asyncio.FIRST_COMPLETED)
    code = 1 if load.done() and not load.cancelled() and load.exception() else 0
    if code == 0:
        await stopping
    await shut_down(app, runner, site, config.drain_timeout if code == 0 else None)
    return code


async def shut_down(app, runner, site, drain_timeout: float | None) -> None:
    """Drain for up to `drain_timeout` seconds (None: no drain), end what still runs, write the
    caches: all within lifecycle.stop_seconds(drain_timeout, cache_close_timeout)."""
    from semcache.http.appkeys import CONFIG, SERVICE
    from semcache.service import lifecycle

    if drain_timeout is not None:
        close = app[CONFIG].cache_close_timeout
        log.info("stopping within %.0f s", lifecycle.stop_seconds(drain_timeout, close))
        await drain(app, site, drain_timeout)
    log.info("shutting down")
    app[SERVICE].start_draining()
    await runner.cleanup()  # handlers still running get CLOSE_GRACE; then the cache writes what is not on disk


async def drain(app, site, timeout: float) -> None:
    """Stop listening at once (a proxy sends new connections elsewhere), refuse queued and new
    requests (overloaded, Retry-After), let running ones finish for up to `timeout` seconds."""
    from semcache.http.appkeys import INFLIGHT, SERVICE
    from semcache.service import lifecycle

    site._server.close()  # no new connections; the open ones stay to finish (or be refused)
    await lifecycle.drain(app[SERVICE], timeout)
    deadline = loop_time() + lifecycle.HANDLER_GRACE
    while app[INFLIGHT].count and loop_time() < deadline:  # let the handlers write their last bytes
        await asyncio.sleep(0.01)


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def _reload_keys(app) -> None:
    from semcache.http.appkeys import KEYRING

    try:
        app[KEYRING].reload()
    except Exception as exc:  # keep serving with the keys we had
        log.error("API keys not reloaded (the previous keys stay): %s", exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":  # client commands: their options are not config keys
        return cli.run(args)
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config = load_config(args.config, overrides=flags)
    except ConfigError as exc:
        print(f"semcache: {exc}", file=sys.stderr)
        return 2
    if config.api_keys_file and not os.access(os.path.expanduser(config.api_keys_file), os.R_OK):
        print(f"semcache: api_keys_file {config.api_keys_file} cannot be read", file=sys.stderr)
        return 2
    refusal = check_auth(config) or check_exposure(config)
    if refusal:
        print(f"semcache: {refusal}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
    try:
        import uvloop

        code = uvloop.run(serve(config))
    except ImportError:
        code = asyncio.run(serve(config))
    # Everything is written and closed by now. Leave without running C++ static destructors: MLX's
    # per-thread stream state, torn down at interpreter exit, sometimes aborted the process
    # ("terminate called without an active exception", exit -6) after a clean shutdown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
