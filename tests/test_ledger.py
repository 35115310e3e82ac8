"""The cache's running totals and age order (cache/ledger.py), against brute force."""

from __future__ import annotations

import random
from dataclasses import dataclass

from semcache.cache.ledger import Ledger


@dataclass(eq=False)
class Item:
    key: str
    tenant: str
    rank: float
    size: int


def ledger() -> Ledger:
    return Ledger(rank=lambda i: i.rank, size=lambda i: i.size, tenant=lambda i: i.tenant)


class TestLedger:
    def test_totals_and_oldest_against_brute_force(self):
        """random adds, uses (ranks grow, unannounced), removals and re-adds: bytes in all and per
        tenant, and the oldest item in all and per tenant (passing over one), are always a recount's."""
        rng = random.Random(3)
        led, live = ledger(), {}
        for step in range(5000):
            op = rng.random()
            if op < 0.4 or not live:
                item = Item(f"k{rng.randrange(800)}", f"t{rng.randrange(4)}", step + rng.random(), rng.randrange(50))
                led[item.key] = live[item.key] = item  # a key already held is replaced
            elif op < 0.6:
                rng.choice(list(live.values())).rank += rng.random() * 100  # a use
            elif op < 0.75:
                key = rng.choice(list(live))
                del led[key], live[key]
            else:
                tenant = rng.choice([None, "t0", "t1", "t9"])
                skip = rng.choice(list(live.values()))
                mine = [i for i in live.values() if tenant is None or i.tenant == tenant]
                expected = min((i for i in mine if i is not skip), key=lambda i: i.rank, default=None)
                assert led.oldest(tenant, skip=skip) is expected
                assert led.bytes_of(tenant) == sum(i.size for i in mine)
            if step % 500 == 0:
                led.check()
        led.check()
        assert len(led) == len(live) and dict(led.items()) == live

    def test_emptied_tenant_leaves_nothing(self):
        """a tenant whose last item goes is forgotten (no empty group), and its bytes are 0."""
        led = ledger()
        led["a"] = Item("a", "t", 1.0, 10)
        led["b"] = Item("b", "u", 2.0, 5)
        assert led.tenants() == ["t", "u"] and led.bytes_of("t") == 10 and led.of("t") == [led["a"]]
        del led["a"]
        assert led.tenants() == ["u"] and led.bytes_of("t") == 0 and led.oldest("t") is None and led.of("t") == []
        led.pop("b")
        assert led == {} and led.bytes == 0 and led.oldest() is None
        led.check()

    def test_stale_rows_do_not_pile_up(self):
        """uses and removals leave stale heap rows; they never outnumber the live items by much."""
        led = ledger()
        items = [Item(f"k{i}", "t", float(i), 1) for i in range(1000)]
        for item in items:
            led[item.key] = item
        for round_ in range(20):
            for item in items:
                item.rank += 1000
            assert led.oldest() is items[0]  # every row stale: each is re-ranked once as it surfaces
        for item in items[:900]:
            del led[item.key]
        assert len(led._heap) <= 2 * len(led) + 64 and led.oldest() is items[900]
        led.check()
