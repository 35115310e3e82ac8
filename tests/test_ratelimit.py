"""Token-bucket rate limits per key and globally, and the rate-limit headers of both dialects."""

from __future__ import annotations

import math

import pytest

from semcache.ops.ratelimit import (
    Dimension,
    RateLimited,
    RateLimiter,
    RateLimits,
    Snapshot,
    TokenBucket,
    anthropic_headers,
    go_duration,
    openai_headers,
    rfc3339,
)
from semcache.ops.throttle import AuthThrottle, client_address, parse_networks


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


@pytest.fixture
def clock():
    return FakeClock()


def levels(limiter: RateLimiter, key: str):
    snap = limiter.snapshot(key)
    return (snap.requests and snap.requests.remaining, snap.tokens and snap.tokens.remaining)


class TestTokenBucket:
    def test_allows_capacity_then_refuses_with_the_right_wait(self, clock):
        """a full bucket gives out exactly capacity units, then says how long until one more."""
        b = TokenBucket(60, 1.0, clock)
        assert all(b.try_take(1) == 0.0 for _ in range(60))
        assert b.try_take(1) == pytest.approx(1.0)
        assert b.try_take(3) == pytest.approx(3.0)
        assert b.level == pytest.approx(0.0)

    def test_refills_continuously(self, clock):
        """the level grows linearly with time and is capped at capacity."""
        b = TokenBucket(10, 2.0, clock)
        b.try_take(10)
        clock.advance(1.5)
        assert b.level == pytest.approx(3.0)
        assert b.seconds_until_full() == pytest.approx(3.5)
        clock.advance(100)
        assert b.level == 10.0 and b.seconds_until_full() == 0.0

    def test_waiting_the_advertised_time_suffices(self, clock):
        """after sleeping exactly the returned wait, the same take succeeds (no float near-miss)."""
        b = TokenBucket(100, 100 / 60, clock)
        b.try_take(100)
        wait = b.try_take(7)
        clock.advance(wait)
        assert b.try_take(7) == 0.0

    def test_more_than_capacity_is_infinite(self, clock):
        """a take larger than capacity can never succeed and returns inf without consuming."""
        b = TokenBucket(5, 1.0, clock)
        assert math.isinf(b.try_take(6))
        assert b.level == 5.0

    def test_give_back_never_exceeds_capacity(self, clock):
        """give_back restores units but never above capacity."""
        b = TokenBucket(5, 1.0, clock)
        b.try_take(2)
        b.give_back(1)
        assert b.level == pytest.approx(4.0)
        b.give_back(100)
        assert b.level == 5.0


class TestRateLimiter:
    def test_rpm_refusal_carries_wait_and_scope(self, clock):
        """past rpm the key is refused with scope 'requests' and the seconds until one request refills."""
        rl = RateLimiter(RateLimits(rpm=2), clock)
        rl.acquire("a", 0)
        rl.acquire("a", 0)
        with pytest.raises(RateLimited) as exc:
            rl.acquire("a", 0)
        assert exc.value.scope == "requests" and not exc.value.never
        assert exc.value.retry_after == pytest.approx(30.0)
        clock.advance(30.0)
        rl.acquire("a", 0)

    def test_refusal_consumes_nothing(self, clock):
        """a refusal by rpm or by tpm leaves both the request and token levels unchanged."""
        rl = RateLimiter(RateLimits(rpm=3, tpm=100), clock)
        rl.acquire("a", 90)
        before = levels(rl, "a")
        with pytest.raises(RateLimited) as exc:
            rl.acquire("a", 50)  # tokens refuse, requests would pass
        assert exc.value.scope == "tokens"
        assert levels(rl, "a") == before == (2, 10)
        rl.acquire("a", 0)
        rl.acquire("a", 0)
        with pytest.raises(RateLimited) as exc:
            rl.acquire("a", 5)  # requests refuse, tokens would pass
        assert exc.value.scope == "requests"
        assert levels(rl, "a") == (0, 10)

    def test_retry_after_is_the_longest_wait(self, clock):
        """when several buckets lack room, retry_after is the wait of the slowest one."""
        rl = RateLimiter(RateLimits(rpm=1, tpm=60), clock)
        rl.acquire("a", 60)
        with pytest.raises(RateLimited) as exc:
            rl.acquire("a", 30)  # requests need 60 s, tokens need 30 s
        assert exc.value.scope == "requests" and exc.value.retry_after == pytest.approx(60.0)

    def test_global_limit_spans_keys(self, clock):
        """global_rpm counts requests from all keys together and refuses with scope 'global'."""
        rl = RateLimiter(RateLimits(rpm=10, global_rpm=2), clock)
        rl.acquire("a", 0)
        rl.acquire("b", 0)
        with pytest.raises(RateLimited) as exc:
            rl.acquire("c", 0)
        assert exc.value.scope == "global" and exc.value.retry_after == pytest.approx(30.0)
        assert rl.snapshot("c").requests == Dimension(2, 0, pytest.approx(60.0))

    def test_keys_are_isolated(self, clock):
        """exhausting one key's buckets leaves another key's untouched."""
        rl = RateLimiter(RateLimits(rpm=1, tpm=10), clock)
        rl.acquire("a", 10)
        with pytest.raises(RateLimited):
            rl.acquire("a", 0)
        rl.acquire("b", 10)
        assert levels(rl, "c") == (1, 10)

    def test_settle_refunds_to_actual_use_once(self, clock):
        """settle returns charged-minus-used tokens; a second settle changes nothing."""
        rl = RateLimiter(RateLimits(tpm=1000), clock)
        grant = rl.acquire("a", 600)  # prompt + max_tokens, charged up front
        assert grant.charged == 600 and levels(rl, "a") == (None, 400)
        grant.settle(250)
        assert levels(rl, "a") == (None, 750)
        grant.settle(0)
        assert levels(rl, "a") == (None, 750)

    def test_settle_over_use_charges_the_rest(self, clock):
        """using more than charged (output is charged as generated) takes the rest, even into debt
        that later requests wait out."""
        rl = RateLimiter(RateLimits(tpm=1000), clock)
        rl.acquire("a", 100).settle(500)
        assert levels(rl, "a") == (None, 500)
        rl.acquire("a", 100).settle(1200)
        assert levels(rl, "a")[1] < 0
        with pytest.raises(RateLimited):
            rl.acquire("a", 1)

    def test_over_tpm_capacity_is_never(self, clock):
        """a request needing more tokens than tpm is refused as 'never' with a clear message, consuming nothing."""
        rl = RateLimiter(RateLimits(rpm=5, tpm=100, global_rpm=5), clock)
        with pytest.raises(RateLimited) as exc:
            rl.acquire("a", 101)
        assert exc.value.never and exc.value.scope == "tokens" and math.isinf(exc.value.retry_after)
        assert "101" in exc.value.message and "100" in exc.value.message and "never" in exc.value.message
        assert levels(rl, "a") == (5, 100)

    @pytest.mark.parametrize("limits", [RateLimits(), RateLimits(rpm=0, tpm=0, global_rpm=0)])
    def test_unlimited_never_refuses_and_has_no_headers(self, clock, limits):
        """None or 0 limits admit everything and report nothing."""
        rl = RateLimiter(limits, clock)
        for _ in range(10_000):
            rl.acquire("a", 10**9).settle(0)
        assert rl.snapshot("a") == Snapshot(None, None)
        assert anthropic_headers(rl.snapshot("a"), 0.0) == {} and openai_headers(rl.snapshot("a")) == {}

    def test_snapshot_reports_limit_remaining_reset(self, clock):
        """snapshot floors the remaining level and reports seconds until the bucket is full."""
        rl = RateLimiter(RateLimits(rpm=60, tpm=6000), clock)
        rl.acquire("a", 3000)
        clock.advance(0.5)
        snap = rl.snapshot("a")
        assert snap.requests == Dimension(60, 59, pytest.approx(0.5))
        assert snap.tokens == Dimension(6000, 3050, pytest.approx(29.5))

    def test_snapshot_reports_the_binding_requests_bucket(self, clock):
        """with both per-key and global rpm, the requests dimension is whichever has fewer remaining."""
        rl = RateLimiter(RateLimits(rpm=10, global_rpm=3), clock)
        rl.acquire("a", 0)
        rl.acquire("b", 0)
        assert rl.snapshot("a").requests.limit == 3 and rl.snapshot("a").requests.remaining == 1
        rl2 = RateLimiter(RateLimits(rpm=2, global_rpm=100), clock)
        rl2.acquire("a", 0)
        assert rl2.snapshot("a").requests == Dimension(2, 1, pytest.approx(30.0))

    def test_idle_full_buckets_are_dropped(self, clock):
        """prune forgets keys whose buckets have refilled completely, keeping busy ones."""
        rl = RateLimiter(RateLimits(rpm=60, tpm=600), clock)
        rl.acquire("idle", 10)
        clock.advance(30)
        rl.acquire("busy", 600)  # tokens take a whole minute to refill
        clock.advance(31)
        assert len(rl) == 2 and rl.prune() == 1 and len(rl) == 1
        assert levels(rl, "idle") == (60, 600)  # a dropped key reads as fresh
        clock.advance(60)
        assert rl.prune() == 1 and len(rl) == 0

    def test_acquire_sweeps_automatically(self, clock):
        """once sweep_at keys are tracked, acquire drops the full ones so memory stays bounded."""
        rl = RateLimiter(RateLimits(rpm=60), clock, sweep_at=4)
        for i in range(100):
            rl.acquire(f"k{i}", 0)
            clock.advance(2)  # every key is full again one second after its request
        assert len(rl) <= 4

    def test_settle_after_drop_is_harmless(self, clock):
        """settling a grant whose key was dropped neither fails nor overfills."""
        rl = RateLimiter(RateLimits(tpm=100), clock)
        grant = rl.acquire("a", 50)
        clock.advance(60)
        rl.prune()
        grant.settle(0)
        assert levels(rl, "a") == (None, 100)


class TestAuthThrottle:
    def test_failures_spend_a_per_address_budget(self, clock):
        """`burst` failures pass, then the address waits for one to refill; others are untouched."""
        t = AuthThrottle(clock=clock, burst=3, per_minute=6)
        for _ in range(3):
            assert t.wait("10.0.0.1") == 0.0
            t.failed("10.0.0.1")
        assert t.wait("10.0.0.1") == pytest.approx(10.0) and t.wait("10.0.0.2") == 0.0
        clock.advance(10.0)
        assert t.wait("10.0.0.1") == 0.0

    def test_an_ipv6_client_counts_by_its_64(self, clock):
        """Every address of one /64 shares a budget: a host cannot rotate through its own prefix."""
        t = AuthThrottle(clock=clock, burst=2, per_minute=1)
        t.failed("2001:db8::1")
        t.failed("2001:db8::2")
        assert t.wait("2001:db8::ffff") > 0 and t.wait("2001:db8:0:1::1") == 0.0

    def test_memory_is_bounded(self, clock):
        """At most max_addresses are tracked, however many fail; refilled ones are dropped first."""
        t = AuthThrottle(clock=clock, burst=5, per_minute=60, max_addresses=50)
        for i in range(10_000):
            t.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        assert len(t) == 50
        clock.advance(60)
        t.failed("192.0.2.1")
        assert len(t) == 1

    @pytest.mark.parametrize("peer, forwarded, expected", [
        ("203.0.113.9", ["1.2.3.4"], "203.0.113.9"),  # not a trusted proxy: its header is ignored
        ("127.0.0.1", [], "127.0.0.1"),  # the proxy's own request
        ("127.0.0.1", ["1.2.3.4"], "1.2.3.4"),
        ("127.0.0.1", ["6.6.6.6, 1.2.3.4"], "1.2.3.4"),  # a client's own X-Forwarded-For is the left part
        ("127.0.0.1", ["1.2.3.4, 10.1.2.3"], "1.2.3.4"),  # a chain of trusted proxies is walked
        ("127.0.0.1", ["6.6.6.6", "1.2.3.4"], "1.2.3.4"),  # several header lines are one list
        ("127.0.0.1", ["1.2.3.4, junk"], "127.0.0.1"),  # unparsable: the nearest trusted hop stands
        ("::ffff:127.0.0.1", ["2001:db8::7"], "2001:db8::7"),
    ])
    def test_client_address(self, peer, forwarded, expected):
        """X-Forwarded-For is read right to left from a trusted peer, up to the first untrusted hop."""
        assert client_address(peer, forwarded, parse_networks(["127.0.0.1", "10.0.0.0/8"])) == expected

    def test_bad_networks_are_errors(self):
        """trusted_proxies entries must be IP addresses or networks; the error names the key."""
        with pytest.raises(ValueError, match="trusted_proxies.*'nginx'"):
            parse_networks(["nginx"])
        with pytest.raises(ValueError, match="trusted_proxies"):
            parse_networks([""])


class TestHeaders:
    SNAP = Snapshot(Dimension(50, 49, 1.2), Dimension(40000, 39000, 360.0))

    def test_openai_header_names_and_values(self):
        """OpenAI headers use x-ratelimit-{limit,remaining,reset}-{requests,tokens} with Go durations."""
        assert openai_headers(self.SNAP) == {
            "x-ratelimit-limit-requests": "50",
            "x-ratelimit-remaining-requests": "49",
            "x-ratelimit-reset-requests": "1.2s",
            "x-ratelimit-limit-tokens": "40000",
            "x-ratelimit-remaining-tokens": "39000",
            "x-ratelimit-reset-tokens": "6m0s",
        }

    @pytest.mark.parametrize("seconds,text", [
        (0, "0s"), (0.02, "20ms"), (0.0201, "21ms"), (1, "1s"), (1.5, "1.5s"),
        (59.999, "59.999s"), (90, "1m30s"), (360, "6m0s"), (3600, "1h0m0s"), (-1, "0s"),
    ])
    def test_go_duration(self, seconds, text):
        """reset durations are Go-style and round up to the millisecond."""
        assert go_duration(seconds) == text

    def test_anthropic_header_names_and_values(self):
        """Anthropic headers use anthropic-ratelimit-{requests,tokens}-* with RFC 3339 reset times in UTC."""
        now = 1_700_000_000.0  # 2023-11-14T22:13:20Z
        assert anthropic_headers(self.SNAP, now) == {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:22Z",
            "anthropic-ratelimit-tokens-limit": "40000",
            "anthropic-ratelimit-tokens-remaining": "39000",
            "anthropic-ratelimit-tokens-reset": "2023-11-14T22:19:20Z",
        }

    def test_rfc3339_rounds_up_to_the_second(self):
        """a reset time is never reported earlier than it is."""
        assert rfc3339(0.0) == "1970-01-01T00:00:00Z"
        assert rfc3339(0.001) == "1970-01-01T00:00:01Z"

    def test_only_limited_dimensions_are_rendered(self):
        """a dimension that is None produces no headers in either dialect."""
        snap = Snapshot(requests=None, tokens=Dimension(10, 10, 0.0))
        assert set(openai_headers(snap)) == {
            "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}
        assert all("tokens" in h for h in anthropic_headers(snap, 0.0))

