"""Token-bucket rate limits per API key and for all keys together, and the headers that report them.

Pure and synchronous (no aiohttp, no asyncio): the HTTP layer calls `RateLimiter.acquire` before
admitting a request, `Grant.settle` when it ends, and renders `snapshot` into headers. Every bucket
is minute-based: capacity = the per-minute limit, refilled continuously at limit/60 per second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

Clock = Callable[[], float]
_EPS = 1e-9  # float slack, so that waiting exactly the advertised time always suffices


class TokenBucket:
    """`capacity` units, refilled at `per_second` up to capacity; starts full; `clock` is monotonic seconds."""

    def __init__(self, capacity: float, per_second: float, clock: Clock):
        self.capacity, self.per_second, self.clock = float(capacity), float(per_second), clock
        self._level, self._at = self.capacity, clock()

    @property
    def level(self) -> float:
        """Units available now (lazily refilled from the clock)."""
        now = self.clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self.per_second)
        self._at = now
        return self._level

    def wait(self, n: float) -> float:
        """Seconds until `n` units are available, without taking: 0.0 if now, inf if n > capacity."""
        if n > self.capacity + _EPS:
            return math.inf
        return max(0.0, (n - self.level - _EPS) / self.per_second)

    def try_take(self, n: float) -> float:
        """Take `n` and return 0.0, or take nothing and return the seconds `wait(n)`."""
        wait = self.wait(n)
        if wait == 0.0:
            self._level = max(0.0, self._level - n)
        return wait

    def give_back(self, n: float) -> None:
        """Return `n` units; the level never exceeds capacity."""
        self._level = min(self.capacity, self.level + max(0.0, n))

    def owe(self, n: float) -> None:
        """Take `n` units already spent, even below zero: later requests wait for the debt to refill."""
        self._level = self.level - max(0.0, n)

    def seconds_until_full(self) -> float:
        """Seconds until the bucket is back at capacity (0.0 when full)."""
        return max(0.0, (self.capacity - self.level - _EPS) / self.per_second)


def _bucket(per_minute: int | None, clock: Clock) -> TokenBucket | None:
    return TokenBucket(per_minute, per_minute / 60.0, clock) if per_minute else None


@dataclass(frozen=True)
class RateLimits:
    """Per-minute limits; None or 0 means unlimited. rpm/tpm apply per key, global_rpm to all keys together."""

    rpm: int | None = None
    tpm: int | None = None
    global_rpm: int | None = None


class RateLimited(Exception):
    """A refusal: nothing was consumed. `retry_after` is the seconds until the same request would pass
    (inf when `never`, i.e. it exceeds a whole bucket and can never pass); `scope` is "requests",
    "tokens" or "global"."""

    def __init__(self, retry_after: float, scope: str, message: str, never: bool = False):
        super().__init__(message)
        self.retry_after, self.scope, self.message, self.never = retry_after, scope, message, never


@dataclass(frozen=True)
class Dimension:
    """One limit as reported in headers: `remaining` is floored; `reset` is seconds until full."""

    limit: int
    remaining: int
    reset: float


@dataclass(frozen=True)
class Snapshot:
    """The limits a key sees; a dimension is None when unlimited (and then produces no headers)."""

    requests: Dimension | None = None
    tokens: Dimension | None = None


@dataclass
class _Key:
    requests: TokenBucket | None
    tokens: TokenBucket | None

    def full(self) -> bool:
        return all(b is None or b.seconds_until_full() == 0.0 for b in (self.requests, self.tokens))


@dataclass
class Grant:
    """An admitted request that was charged `charged` tokens up front."""

    limiter: RateLimiter
    key: str
    charged: int
    settled: bool = field(default=False)

    def settle(self, used_tokens: int) -> None:
        """Settle on what the request used: refund what was charged and not used, or charge what
        it used beyond the charge (output is charged as generated); only the first call counts."""
        if self.settled:
            return
        self.settled = True
        entry = self.limiter._keys.get(self.key)
        if entry is not None and entry.tokens is not None:
            entry.tokens.give_back(max(0, self.charged - used_tokens))
            entry.tokens.owe(max(0, used_tokens - self.charged))


class RateLimiter:
    """Requests- and tokens-per-minute buckets per key plus one global requests bucket.

    Memory is bounded: a key's buckets are created on its first `acquire` and dropped by `prune`
    once all of them are full again (a full bucket is indistinguishable from a new one, so dropping
    it forgets nothing). `acquire` prunes automatically whenever the number of tracked keys reaches
    `sweep_at`, then sets the next threshold to twice the survivors (at least `sweep_at`), so the
    table holds at most about twice the keys active within the last minute.
    """

    def __init__(self, limits: RateLimits, clock: Clock = time.monotonic, sweep_at: int = 1024):
        self.limits, self.clock = limits, clock
        self._global = _bucket(limits.global_rpm, clock)
        self._keys: dict[str, _Key] = {}
        self._sweep_at = self._next_sweep = max(1, sweep_at)

    def __len__(self) -> int:  # keys currently tracked
        return len(self._keys)

    def prune(self) -> int:
        """Drop every key whose buckets are all full; return how many were dropped."""
        idle = [k for k, entry in self._keys.items() if entry.full()]
        for k in idle:
            del self._keys[k]
        return len(idle)

    def acquire(self, key: str, tokens: int, requests: int = 1) -> Grant:
        """Charge `requests` (one, or none when the request was charged on arrival) and `tokens`
        (prompt + max_tokens) to `key` and to the global bucket.

        Raises RateLimited without consuming anything from any bucket if any bucket lacks room;
        `retry_after` is then the longest wait among them (all must have room at once).
        """
        tokens = max(0, int(tokens))
        tpm = self.limits.tpm
        if tpm and tokens > tpm:
            raise RateLimited(math.inf, "tokens", f"this request needs {tokens} tokens but the limit is "
                              f"{tpm} tokens per minute, so it can never be admitted; reduce the "
                              f"prompt or max_tokens", never=True)
        if len(self._keys) >= self._next_sweep:
            self.prune()
            self._next_sweep = max(self._sweep_at, 2 * len(self._keys))
        entry = self._keys.get(key) or _Key(_bucket(self.limits.rpm, self.clock),
                                            _bucket(tpm, self.clock))
        checks = [(b, n, scope) for b, n, scope in ((self._global, requests, "global"),
                  (entry.requests, requests, "requests"), (entry.tokens, tokens, "tokens")) if b is not None]
        waits = [(b.wait(n), scope) for b, n, scope in checks]
        wait, scope = max(waits, default=(0.0, ""), key=lambda w: w[0])
        if wait > 0.0:
            raise RateLimited(wait, scope, f"rate limit exceeded ({scope}); retry in {wait:.3f}s")
        for b, n, _ in checks:
            b.try_take(n)
        self._keys[key] = entry
        return Grant(self, key, tokens if entry.tokens is not None else 0)

    def snapshot(self, key: str) -> Snapshot:
        """What `key` sees now. The requests dimension reports whichever of the key's and the global
        bucket binds harder (fewer remaining, then longer reset). An unseen key reads as full."""
        entry = self._keys.get(key)
        reqs = [(self.limits.rpm, entry.requests if entry else None), (self.limits.global_rpm, self._global)]
        dims = [_dimension(limit, b) for limit, b in reqs if limit]
        requests = min(dims, key=lambda d: (d.remaining, -d.reset), default=None)
        tpm = self.limits.tpm
        return Snapshot(requests, _dimension(tpm, entry.tokens if entry else None) if tpm else None)


def _dimension(limit: int, bucket: TokenBucket | None) -> Dimension:
    if bucket is None:
        return Dimension(limit, limit, 0.0)
    return Dimension(limit, math.floor(bucket.level + _EPS), bucket.seconds_until_full())


def go_duration(seconds: float) -> str:
    """OpenAI's reset format (Go durations), rounded up to the millisecond: "20ms", "1s", "1.5s", "6m0s"."""
    ms = math.ceil(max(0.0, seconds) * 1000 - _EPS)
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    return (f"{h}h{m}m" if h else f"{m}m" if m else "") + s


def rfc3339(epoch: float) -> str:
    """UTC RFC 3339 timestamp with Z, rounded up to the whole second: "2024-01-01T00:00:01Z"."""
    return datetime.fromtimestamp(math.ceil(epoch - _EPS), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _render(snap: Snapshot, name: str, reset: Callable[[float], str]) -> dict[str, str]:
    out = {}
    for dim, d in (("requests", snap.requests), ("tokens", snap.tokens)):
        if d is not None:
            values = (str(d.limit), str(d.remaining), reset(d.reset))
            out.update((name.format(field=f, dim=dim), v) for f, v in zip(("limit", "remaining", "reset"), values))
    return out


def anthropic_headers(snap: Snapshot, now: float) -> dict[str, str]:
    """anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}; reset = RFC 3339 of wall-clock `now` + seconds."""
    return _render(snap, "anthropic-ratelimit-{dim}-{field}", lambda s: rfc3339(now + s))


def openai_headers(snap: Snapshot) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens}; reset as a Go duration."""
    return _render(snap, "x-ratelimit-{field}-{dim}", go_duration)


