"""`semcache top`: GET /v1/status as a terminal view that refreshes every second, as htop does.

The screen: the model, uptime, queue and active counts, hit rate and TTFT over 5 minutes; the cache
tiers as bars against their budgets; the agents; the last requests, coloured by hit type. `q` or
Ctrl-C quits (the terminal is given back as it was); `--once` prints one frame and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import time

from semcache.ops.cli import OK, Call, Failure, _client, _resolve, ago, error_message, fetch, human_bytes, table

COLOURS = {"memory": "\x1b[32m", "disk": "\x1b[34m", "miss": "\x1b[33m"}
RESET, BOLD = "\x1b[0m", "\x1b[1m"
ENTER, LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"  # the alternate screen, cursor hidden
HOME = "\x1b[H\x1b[2J"
STATUS = Call("GET", lambda a: "/v1/status", lambda body: "")  # the options and key `top` shares with the others


def add_command(subparsers: argparse._SubParsersAction) -> None:
    top = _client(subparsers.add_parser("top", help="a live terminal view of the cache and requests"), STATUS)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--no-color", dest="color", action="store_false", help="no ANSI colours")
    top.set_defaults(cli_action=main)


def main(args: argparse.Namespace) -> int:
    """Run `semcache top` (through cli.run, which turns a Failure into its exit code)."""
    args = _resolve(args, STATUS)
    if args.interval <= 0:
        raise Failure(2, f"--interval must be positive (got {args.interval})")
    args.color = args.color and sys.stdout.isatty()
    if args.json:  # one answer, as received
        print(json.dumps(asyncio.run(status(args, 50)), indent=2, sort_keys=True))
        return OK
    if args.once:
        width, height = shutil.get_terminal_size()
        print(render(asyncio.run(status(args, height)), width, height, args.color))
        return OK
    try:
        asyncio.run(loop(args))
    except KeyboardInterrupt:
        pass
    return OK


async def status(args: argparse.Namespace, height: int) -> dict:
    """The status the key may see; Failure for an error answer (a wrong key ends `top`)."""
    code, body = await fetch("GET", f"{args.url}/v1/status?limit={max(1, min(500, height))}", args.api_key,
                             args.timeout)
    if code >= 300 or not isinstance(body, dict):
        raise Failure(1, f"{error_message(body, code)} ({code})")
    return body


async def loop(args: argparse.Namespace) -> None:
    """Redraw every interval until `q` (or Ctrl-C); an unreachable daemon is shown, then retried."""
    quit_ = asyncio.Event()
    with _screen(quit_):
        while not quit_.is_set():
            width, height = shutil.get_terminal_size()
            try:
                frame = render(await status(args, height), width, height, args.color)
            except Failure as exc:
                if exc.code != 3:  # an answer that is an error (a bad key): nothing to retry
                    raise
                frame = f"semcache top: {exc}\nretrying every {args.interval:g}s (q quits)"
            sys.stdout.write(HOME + frame)
            sys.stdout.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(quit_.wait(), args.interval)


@contextlib.contextmanager
def _screen(quit_: asyncio.Event):
    """The alternate screen, and keys read one at a time (`q` sets `quit_`), when stdin is a terminal."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, lambda: quit_.set() if sys.stdin.read(1) in ("q", "Q") else None)
    sys.stdout.write(ENTER)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sys.stdout.write(LEAVE)
        sys.stdout.flush()


def bar(used: int, budget: int, width: int) -> str:
    filled = min(width, round(width * used / budget)) if budget else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms"


def render(body: dict, width: int = 100, height: int = 40, color: bool = False, now: float | None = None) -> str:
    """One frame of `top`, cut to `width` x `height` characters."""
    now = time.time() if now is None else now
    paint = (lambda text, kind: f"{COLOURS.get(kind, '')}{text}{RESET}") if color else (lambda text, kind: text)
    model = body.get("model") or {}
    window = body["window"]
    rate = "-" if window["hit_rate"] is None else f"{100 * window['hit_rate']:.0f}%"
    lines = [
        f"semcache  {model.get('id', 'loading')}  up {body['uptime_seconds']:.0f}s  "
        f"queued {body['queue_depth']}  active {body['active']}",
        f"last {window['seconds'] // 60} min: {window['requests']} requests, hit rate {rate}, TTFT p50 "
        f"{_ms(window['ttft_ms']['p50'])} p95 {_ms(window['ttft_ms']['p95'])} (warm p50 "
        f"{_ms(window['ttft_ms_warm']['p50'])}, cold p50 {_ms(window['ttft_ms_cold']['p50'])})",
        "",
    ]
    for name, tier in body.get("tiers", {}).items():
        lines.append(f"{name:<7}{bar(tier['bytes'], tier['budget'], max(10, min(40, width - 50)))} "
                     f"{human_bytes(tier['bytes'])} / {human_bytes(tier['budget'])}, {tier['entries']} entries")
    agents = [[a["agent_id"], a["tier"], str(a["tokens"]), human_bytes(a["bytes"]),
               ago(a["last_use"], now)] for a in body["agents"]]
    requests = [[time.strftime("%H:%M:%S", time.localtime(r["time"])), r["agent"], r["route"], str(r["status"]),
                 r["cache"], f"{r['cached_tokens']}/{r['prompt_tokens']}",
                 str(r["output_tokens"]), _ms(r["ttft_ms"]), _ms(r["duration_ms"])] for r in body["requests"]]
    room = max(2, (height - len(lines) - 5) // 2)  # the rest of the screen, shared by the two tables
    lines += ["", BOLD * color + "AGENTS" + RESET * color]
    lines += table([["AGENT", "TIER", "TOKENS", "SIZE", "LAST USE"], *agents[:room]],
                   right=frozenset({2, 3})).splitlines() if agents else ["no cached agents"]
    lines += ["", BOLD * color + "REQUESTS" + RESET * color]
    shown = table([["TIME", "AGENT", "ROUTE", "STATUS", "CACHE", "CACHED", "OUT", "TTFT", "TOTAL"], *requests[:room]],
                  right=frozenset({3, 5, 6, 7, 8})).splitlines()
    lines += [shown[0], *(paint(line, row[4]) for line, row in zip(shown[1:], requests))] if requests else ["none yet"]
    return "\n".join(_cut(line, width, color) for line in lines[:height - 1])


def _cut(line: str, width: int, color: bool) -> str:
    """The line cut to `width` visible characters (colour codes are not counted)."""
    if not color:
        return line[:width]
    shown, out, i = 0, [], 0
    while i < len(line) and shown < width:
        if line[i] == "\x1b":
            end = line.index("m", i) + 1
            out.append(line[i:end])
            i = end
            continue
        out.append(line[i])
        shown += 1
        i += 1
    return "".join(out) + RESET
