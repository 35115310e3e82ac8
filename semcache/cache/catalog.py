"""Where the agent cache finds its entries: by tenant and tokens, and by agent.

Per tenant, a radix trie over all its entries (a lookup's longest prefix, whoever stored it) and
one over its anonymous entries only (which of them an anonymous sequence extends, without looking
at the others); per agent, its entries' keys (an anonymous entry is its own `anon-...` agent). An
emptied set or trie is dropped at once, so nothing is kept for tenants and agents that are gone.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from semcache.cache.entry import Entry, common_prefix
from semcache.cache.trie import TokenTrie


class Catalog:
    def __init__(self, entries: Mapping[str, Entry]) -> None:
        self.entries = entries  # the index's, by key: what the keys found here name
        self.tries: dict[str, TokenTrie] = {}  # by tenant: all its entries
        self.anonymous: dict[str, TokenTrie] = {}  # by tenant: its anonymous entries
        self.pools: dict[tuple[str, str], set[str]] = {}  # by (tenant, agent id): entry keys

    def add(self, entry: Entry) -> None:
        tokens = entry.tokens.tolist()
        for tries in self._tries_of(entry):
            tries.setdefault(entry.tenant, TokenTrie()).insert(tokens, entry.key)
        self.pools.setdefault((entry.tenant, entry.agent), set()).add(entry.key)

    def discard(self, entry: Entry) -> None:
        tokens = entry.tokens.tolist()
        for tries in self._tries_of(entry):
            trie = tries[entry.tenant]
            trie.remove(tokens, entry.key)
            if not len(trie):
                del tries[entry.tenant]
        pool = self.pools[(entry.tenant, entry.agent)]
        pool.discard(entry.key)
        if not pool:
            del self.pools[(entry.tenant, entry.agent)]

    def _tries_of(self, entry: Entry) -> tuple[dict[str, TokenTrie], ...]:
        return (self.tries,) if entry.named else (self.tries, self.anonymous)

    def pool(self, tenant: str, agent: str) -> list[Entry]:
        """One agent's entries (an anonymous one's by its anon- id)."""
        return [self.entries[k] for k in self.pools.get((tenant, agent), ())]

    def extended(self, tenant: str, agent: str | None, tokens: np.ndarray,
                 fresh_start: bool) -> tuple[Entry | None, list[Entry]]:
        """(an entry of the agent already holding all of `tokens`, or None; else the agent's entries
        that `tokens` extends, which it replaces: with `fresh_start`, all of a named agent's). No
        agent: the tenant's anonymous entries, found through their trie."""
        if agent is None:
            trie = self.anonymous.get(tenant)
            prefixes, extensions = trie.along(tokens.tolist()) if trie is not None else ([], iter(()))
            holder = next(extensions, None)
            return (self.entries[holder], []) if holder is not None else (None, [self.entries[k] for k in prefixes])
        replaced = []
        for old in self.pool(tenant, agent):
            shared = common_prefix(old.tokens, tokens)
            if shared == old.num_tokens or fresh_start:
                replaced.append(old)
            elif shared == len(tokens):
                return old, []
        return None, replaced

    def longest(self, tenant: str, tokens: list[int]) -> tuple[int, Iterator[str]]:
        """The longest prefix of `tokens` any of the tenant's entries shares, and those entries' keys."""
        trie = self.tries.get(tenant)
        return trie.longest(tokens) if trie is not None else (0, iter(()))

    def check(self, live: list[Entry]) -> None:
        """Assert the tries and pools hold exactly the live entries, and no empty set or trie."""
        assert sum(len(t) for t in self.tries.values()) == len(live), "trie out of step with entries"
        assert sum(len(t) for t in self.anonymous.values()) == sum(not e.named for e in live), "anonymous trie"
        assert sum(len(keys) for keys in self.pools.values()) == len(live), "agent pools out of step"
        assert all(self.pools.values()) and all(map(len, self.tries.values())) and all(
            map(len, self.anonymous.values())), "an empty pool or trie was kept"
        assert all(e.key in self.pools.get((e.tenant, e.agent), ()) for e in live), "entry missing from its pool"
