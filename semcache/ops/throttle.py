"""Failed authentications per client address, and which address a request comes from.

Pure and synchronous, like ratelimit: the auth middleware asks `wait` before it compares any key
and calls `failed` after every refusal (401, 403). Behind a proxy every peer is the proxy, so the
client is read from X-Forwarded-For, but only when the peer is one of `trusted_proxies`.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable

from semcache.ops.ratelimit import Clock, TokenBucket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

AUTH_BURST = 10  # failures an address may have at once ...
AUTH_PER_MINUTE = 10  # ... and then this many a minute
MAX_ADDRESSES = 4096  # addresses tracked at most (about 1.3 MB, measured with tracemalloc)


def parse_networks(items: Iterable[str], key: str = "trusted_proxies") -> tuple[Network, ...]:
    """IP addresses or CIDR networks, or a ValueError that names `key` and the bad item."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{key}: {item!r} is not an IP address or network "
                             "(try 127.0.0.1 or 10.0.0.0/8)") from None
    return tuple(out)


def _address(text: str) -> Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:a.b.c.d is a.b.c.d


def client_address(peer: str | None, forwarded: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """The peer's address; while that hop is a trusted proxy, the one before it in X-Forwarded-For
    (read right to left: what a client sends itself stands at the left). An unparsable entry stops
    the walk at the last trusted hop, so a client can never pick the address it is counted under."""
    ip = _address(peer or "")
    if ip is None:
        return peer or "unknown"
    hops = [hop for value in forwarded for hop in value.split(",")]
    for hop in reversed(hops):
        before = _address(hop)
        if before is None or not any(ip in net for net in trusted):
            break
        ip = before
    return str(ip)


def _group(address: str) -> str:
    """Whose budget an address spends: its own, or for IPv6 its /64 (one host's whole prefix)."""
    ip = _address(address)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if isinstance(ip, ipaddress.IPv6Address) else address


class AuthThrottle:
    """A token bucket of failures per client address: `burst` at once, then `per_minute`. While an
    address has none left, its requests are refused before any key is compared, so no guess is
    checked. Memory is bounded: at most `max_addresses` buckets, least recently failed dropped
    first, and refilled ones as soon as they are the oldest."""

    def __init__(self, trusted_proxies: Iterable[str] = (), clock: Clock = time.monotonic,
                 burst: int = AUTH_BURST, per_minute: int = AUTH_PER_MINUTE, max_addresses: int = MAX_ADDRESSES):
        self.trusted = parse_networks(trusted_proxies)
        self.clock, self.burst, self.per_minute = clock, burst, per_minute
        self.max_addresses = max(1, max_addresses)
        self._buckets: dict[str, TokenBucket] = {}  # in order of last failure, oldest first

    def __len__(self) -> int:
        return len(self._buckets)

    def address(self, peer: str | None, forwarded: Iterable[str]) -> str:
        return client_address(peer, forwarded, self.trusted)

    def wait(self, address: str) -> float:
        """Seconds until `address` may try a key again (0.0: now)."""
        bucket = self._buckets.get(_group(address))
        return bucket.wait(1) if bucket is not None else 0.0

    def failed(self, address: str) -> None:
        """Count one refused attempt from `address`."""
        group = _group(address)
        bucket = self._buckets.pop(group, None) or TokenBucket(self.burst, self.per_minute / 60.0, self.clock)
        bucket.owe(1)
        self._buckets[group] = bucket
        while len(self._buckets) > 1:
            oldest = next(iter(self._buckets))
            if len(self._buckets) <= self.max_addresses and self._buckets[oldest].seconds_until_full() > 0:
                break
            del self._buckets[oldest]
