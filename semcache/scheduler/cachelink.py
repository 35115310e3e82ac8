"""The scheduler's side of the agent cache: a request's lookup (an entry on disk starts loading while
the request waits), the hit handed to the engine at admission, and the hits the engine could not
use: their entries are quarantined (never served again) and their requests, which the engine
prefilled from scratch instead, report no cached tokens.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from semcache.cache.index import MISS, AgentCache, Match
from semcache.cache.kvdata import KVData
from semcache.scheduler.sequence import Sequence

log = logging.getLogger("semcache.scheduler")


class CacheLink:
    def __init__(self, cache: AgentCache | None, wake: Callable[[], None]):
        """`wake` is called when an entry a waiting request needs has finished loading."""
        self.cache, self._wake = cache, wake

    def lookup(self, seq: Sequence) -> Match | None:
        """The sequence's cache match once resident; None while its entry loads from disk."""
        if self.cache is None:
            return MISS
        match = self.cache.lookup(seq.tenant, seq.agent, seq.feed_ids)
        if match.entry is None:
            return match
        loading = self.cache.fetch(match.entry)
        if loading is None:
            return match
        seq.cache_from_disk = True
        loading.add_done_callback(lambda _: self._wake())
        return None

    def prefix(self, seq: Sequence, match: Match) -> KVData | None:
        """The KV the engine starts an admitted sequence from (None: a miss); the lookup is counted."""
        if self.cache is None:
            return None
        if not seq.num_preemptions:  # a resumed sequence's usage counts its first admission's hit
            self.cache.record(match, seq.num_prompt_tokens, seq.cache_from_disk)
            seq.num_cached_tokens = match.num_tokens
        seq.cache_entry = match.entry
        return match.entry.data.prefix(match.num_tokens) if match.entry is not None else None

    def reject(self, seqs: Iterable[Sequence]) -> None:
        """The engine could not use these sequences' hits and prefills them from scratch."""
        for seq in seqs:
            entry, seq.cache_entry = seq.cache_entry, None
            if entry is not None and self.cache is not None:
                log.warning("agent cache entry %s of %s failed in the engine: quarantined", entry.key, entry.agent)
                self.cache.disk.reject(entry)
            if not seq.num_preemptions:
                seq.num_cached_tokens = 0
