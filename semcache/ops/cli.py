"""Client commands for a running daemon: `semcache agents|health|models` and `semcache config check`.

Wiring: `add_commands(sub)` next to the `serve` parser, then `return run(args)` for any other command.
Exit codes: 0 ok, 1 the daemon answered with an error, 2 usage or config error, 3 daemon unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from semcache.ops.config import ConfigError, load_config

DEFAULT_URL = "http://127.0.0.1:8000"
OK, DAEMON_ERROR, USAGE, UNREACHABLE = 0, 1, 2, 3
_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


@dataclass(frozen=True)
class Call:
    """One HTTP request a command makes, and how a JSON answer is shown; `soft` statuses render but exit 1."""

    method: str
    path: Callable[[argparse.Namespace], str]
    render: Callable[[Any], str]
    key: str = "api_key"  # the args attribute sent as x-api-key
    soft: frozenset[int] = field(default_factory=frozenset)


class Failure(Exception):
    """A command failed before or instead of an answer; `code` is the exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `agents {ls,show,rm,evict,purge}`, `health`, `models` and `config check` to `subparsers`."""
    agents = subparsers.add_parser("agents", help="list, inspect, evict or delete agents' cached KV")
    verbs = agents.add_subparsers(dest="verb", required=True, metavar="{ls,show,rm,evict,purge}")
    _client(verbs.add_parser("ls", help="list every cached entry"), Call("GET", lambda a: "/v1/agents", render_list))
    for verb, method, suffix, render, text in (
        ("show", "GET", "", render_agent, "show one agent's entries"),
        ("rm", "DELETE", "", render_deleted, "delete one agent's entries"),
        ("evict", "POST", "/evict", render_agent, "move one agent's entries from memory to disk"),
    ):
        sub = _client(verbs.add_parser(verb, help=text), Call(method, _agent_path(suffix), render))
        sub.add_argument("agent_id", metavar="ID")
    purge = _client(verbs.add_parser("purge", help="delete every entry of a tenant (admin)"),
                    Call("DELETE", lambda a: f"/admin/tenants/{quote(a.tenant, safe='')}/agents",
                         render_purged, key="admin_key"))
    purge.add_argument("--tenant", required=True, metavar="NAME", help="the tenant whose entries to delete")
    purge.add_argument("--admin-key", dest="admin_key", help="admin key (default: env SEMCACHE_ADMIN_KEY)")
    health = _client(subparsers.add_parser("health", help="ask whether the daemon is ready"),
                     Call("GET", lambda a: f"/health/{a.probe}", render_health, soft=frozenset({503})))
    health.add_argument("--probe", choices=("ready", "live", "startup"), default="ready",
                        help="which health route to ask (default ready)")
    _client(subparsers.add_parser("models", help="list the served model ids"),
            Call("GET", lambda a: "/v1/models", render_models))
    config = subparsers.add_parser("config", help="configuration tools")
    checks = config.add_subparsers(dest="verb", required=True)
    check = checks.add_parser("check", help="validate a TOML config file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(cli_action=config_check)


def _client(parser: argparse.ArgumentParser, call: Call) -> argparse.ArgumentParser:
    """Give `parser` the common client options and make it run `call`."""
    parser.add_argument("--url", help=f"daemon base URL (default: env SEMCACHE_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", dest="api_key", help="sent as x-api-key (default: env SEMCACHE_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the JSON answer as received")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
    parser.set_defaults(cli_action=call)
    return parser


def _agent_path(suffix: str) -> Callable[[argparse.Namespace], str]:
    """The path builder for /v1/agents/{ID}{suffix}, with ID percent-encoded."""
    return lambda a: f"/v1/agents/{quote(a.agent_id, safe='')}{suffix}"


def run(args: argparse.Namespace) -> int:
    """Run a command added by add_commands; print its output and return the exit code (0, 1, 2 or 3)."""
    action = getattr(args, "cli_action", None)
    try:
        if isinstance(action, Call):
            return asyncio.run(_run_call(action, _resolve(args, action)))
        if callable(action):
            return action(args)
        raise Failure(USAGE, f"not a client command: {getattr(args, 'command', None)!r}")
    except Failure as exc:
        print(f"semcache: {exc}", file=sys.stderr)
        return exc.code


def _resolve(args: argparse.Namespace, call: Call) -> argparse.Namespace:
    """Fill URL and keys from the environment; Failure(USAGE) for a bad URL, timeout or missing admin key."""
    args.url = (args.url or os.environ.get("SEMCACHE_URL") or DEFAULT_URL).rstrip("/")
    args.api_key = args.api_key or os.environ.get("SEMCACHE_API_KEY") or None
    if not args.url.startswith(("http://", "https://")):
        raise Failure(USAGE, f"--url must start with http:// or https:// (got {args.url!r})")
    if args.timeout <= 0:
        raise Failure(USAGE, f"--timeout must be positive (got {args.timeout})")
    if call.key == "admin_key":
        args.admin_key = args.admin_key or os.environ.get("SEMCACHE_ADMIN_KEY") or None
        if not args.admin_key:
            raise Failure(USAGE, "agents purge needs --admin-key or SEMCACHE_ADMIN_KEY")
    return args


async def _run_call(call: Call, args: argparse.Namespace) -> int:
    """Make the request and print the answer: 0 on 2xx, 1 on an error answer or a `soft` status."""
    status, body = await fetch(call.method, args.url + call.path(args), getattr(args, call.key), args.timeout)
    if args.json and isinstance(body, (dict, list)):
        print(json.dumps(body, indent=2, sort_keys=True))
    if status < 300 or status in call.soft:
        if not isinstance(body, dict):
            raise Failure(DAEMON_ERROR, f"unexpected answer from {args.url} ({status}, not JSON)")
        if not args.json:
            print(call.render(body))
        return OK if status < 300 else DAEMON_ERROR
    raise Failure(DAEMON_ERROR, f"{error_message(body, status)} ({status})")


async def fetch(method: str, url: str, api_key: str | None, timeout: float) -> tuple[int, Any]:
    """(status, JSON body, text or None); Failure(UNREACHABLE) when no HTTP answer arrives in `timeout` s."""
    headers = {"x-api-key": api_key} if api_key else {}
    base = url.split("/", 3)[:3]
    try:
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                    session.request(method, url, headers=headers) as response):
            return response.status, _json_or_text(await response.text(errors="replace"))
    except aiohttp.InvalidURL as exc:
        raise Failure(USAGE, f"invalid URL {exc}") from exc
    except TimeoutError as exc:
        raise Failure(UNREACHABLE, f"cannot reach {'/'.join(base)}: no answer within {timeout:g} s") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise Failure(UNREACHABLE, f"cannot reach {'/'.join(base)}: {exc}") from exc


def _json_or_text(text: str) -> Any:
    """The decoded JSON, else the stripped text, else None for an empty body."""
    try:
        return json.loads(text)
    except ValueError:
        return text.strip() or None


def error_message(body: Any, status: int) -> str:
    """The message of an OpenAI- or Anthropic-shaped error body, else the raw text or the status."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message"):
        return str(body["error"]["message"])
    if isinstance(body, str) and body:
        return body[:200]
    return f"HTTP {status}"


def config_check(args: argparse.Namespace) -> int:
    """Validate a TOML config file alone (no environment): print "ok: FILE" and 0, or Failure(USAGE)."""
    try:
        load_config(args.file, environ={})
    except ConfigError as exc:
        raise Failure(USAGE, str(exc)) from exc
    print(f"ok: {args.file}")
    return OK


def human_bytes(n: int) -> str:
    """Decimal units with one decimal: 512 B, 43.1 MB, 2.0 GB."""
    if abs(n) < 1000:
        return f"{n} B"
    size = float(n)
    for unit in _UNITS[1:-1]:
        size /= 1000
        if abs(size) < 999.95:  # else it would print as 1000.0
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} {_UNITS[-1]}"


def ago(ts: float, now: float | None = None) -> str:
    """'12s ago', '5m ago' or '3h ago' within a day; older (or future) stamps as local 'YYYY-MM-DD HH:MM'."""
    delta = (time.time() if now is None else now) - ts
    if 0 <= delta < 60:
        return f"{int(delta)}s ago"
    if 0 <= delta < 3600:
        return f"{int(delta // 60)}m ago"
    if 0 <= delta < 86400:
        return f"{int(delta // 3600)}h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def table(rows: list[list[str]], right: frozenset[int] = frozenset()) -> str:
    """Columns padded to their widest cell (columns in `right` right-aligned), two spaces apart."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(*rows)]
    lines = []
    for row in rows:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _entry_rows(entries: list[dict], with_id: bool) -> str:
    head = ["ENTRY"] if with_id else ["AGENT"]
    rows = [[e["entry_id"] if with_id else e["agent_id"], e["tier"], str(e["tokens"]), human_bytes(e["bytes"]),
             ago(e["last_use"])] for e in entries]
    return table([head + ["TIER", "TOKENS", "SIZE", "LAST USE"], *rows], right=frozenset({2, 3}))


def render_list(body: dict) -> str:
    """`agents ls`: one row per cached entry, or a line saying there are none."""
    return _entry_rows(body["data"], with_id=False) if body.get("data") else "no cached agents"


def render_agent(body: dict) -> str:
    """`agents show|evict`: the agent's totals, then one row per entry."""
    entries = body.get("entries", [])
    summary = table([["agent", body["agent_id"]], ["tokens", str(body["tokens"])],
                     ["size", human_bytes(body["bytes"])], ["entries", str(len(entries))]])
    return f"{summary}\n\n{_entry_rows(entries, with_id=True)}" if entries else summary


def render_deleted(body: dict) -> str:
    """`agents rm`: how many entries went."""
    return f"deleted {body['entries']} entries of agent {body['agent_id']}"


def render_purged(body: dict) -> str:
    """`agents purge`: how many entries of the tenant went."""
    return f"deleted {body['deleted']} entries of tenant {body['tenant']}"


def render_health(body: dict) -> str:
    """One line: the status, model, running and queued sequences (the daemon shows those counts
    only to a caller with a valid key when API keys are configured)."""
    counts = f", {body['active']} active, {body['queue_depth']} queued" if "active" in body else ""
    return f"{body.get('status')}: model {body.get('model')}{counts}"


def render_models(body: dict) -> str:
    """`models`: one model id a line."""
    return "\n".join(str(m["id"]) for m in body.get("data", []))
