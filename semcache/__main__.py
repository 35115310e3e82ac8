"""Command line: `semcache serve [--host] [--port] [--model] [--cache-dir] [--config]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys

from semcache import __version__
from semcache.config import Config, ConfigError, load_config

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
    return parser


async def serve(config: Config) -> int:
    """Bind first, then load the model in the background; exit 0 on SIGTERM/SIGINT, 1 if loading fails."""
    from aiohttp import web

    from semcache.app import BOUND, LOAD_TASK, make_app
    from semcache.keys import SERVICE

    app = make_app(config)
    app[BOUND] = asyncio.Event()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
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
    app[BOUND].set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    load = app[LOAD_TASK]
    await asyncio.wait([stopping, load], return_when=asyncio.FIRST_COMPLETED)
    code = 1 if load.done() and not load.cancelled() and load.exception() else 0
    if code == 0:
        await stopping
    log.info("shutting down")
    app[SERVICE].scheduler.draining = True  # /health/ready turns 503 and new work is refused
    await runner.cleanup()
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config = load_config(args.config, overrides=flags)
    except ConfigError as exc:
        print(f"semcache: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop

        return uvloop.run(serve(config))
    except ImportError:
        return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
