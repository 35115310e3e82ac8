"""The agent cache's values: limits, entries, lookup answers, shared by the index and the disk tier."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from semcache.cache.kvdata import KVData

if TYPE_CHECKING:
    from semcache.ops.config import Config

ANON = "anon-"


@dataclass(frozen=True)
class CacheLimits:
    memory_budget: int = 2 << 30
    disk_budget: int = 20 << 30
    ttl: float = 7 * 86400.0
    min_prefix: int = 64
    encoding: str = "native"  # on disk: native (lossless), int8, int4
    write_through: bool = True  # write every new entry soon, so a crash loses little
    tenant_share: float | None = None  # of each budget, what one tenant may hold (None: no limit)
    read_timeout: float = 10.0  # seconds a file read may take before it is a miss
    write_timeout: float = 60.0  # seconds a file write (or move, removal) may take before it has failed
    close_timeout: float = 10.0  # seconds shutdown waits for file work (then abandons it)

    @classmethod
    def from_config(cls, config: Config) -> CacheLimits:
        """The limits a daemon's configuration sets (its cache_* keys)."""
        return cls(
            memory_budget=config.cache_memory_budget,
            disk_budget=config.cache_disk_budget,
            ttl=config.cache_ttl,
            min_prefix=config.cache_min_prefix,
            encoding=config.cache_disk_encoding,
            write_through=config.cache_write_through,
            tenant_share=config.cache_tenant_share,
            read_timeout=config.cache_read_timeout,
            write_timeout=config.cache_write_timeout,
            close_timeout=config.cache_close_timeout,
        )

    def share(self, budget: int) -> int | None:
        """What one tenant may hold of `budget` (None: no per-tenant limit)."""
        return None if self.tenant_share is None else int(budget * self.tenant_share)


@dataclass(eq=False)
class Entry:
    key: str
    tenant: str
    agent: str  # the agent id, or anon-<key> for requests that named none
    named: bool
    tokens: np.ndarray  # int32 token ids the KV covers
    dtype: str
    created: float
    last_use: float
    data: KVData | None = None  # resident in memory
    pending: KVData | None = None  # spilled: held only until its file is written
    path: Path | None = None
    file_bytes: int = 0
    dirty: bool = False  # the data is not on disk yet
    writing: asyncio.Task | None = None
    loading: asyncio.Task | None = None
    removed: bool = False
    retry_at: float = 0.0  # monotonic time before which lookups pass it over (its file could not be read)
    # Files of the entries this one replaced: deleted only once this one is on disk, so a crash in
    # between leaves the agent its previous turn rather than nothing.
    superseded: list[tuple[Path, int]] = field(default_factory=list)
    background: bool = False  # stored by a client's side request: evicted first, never evicts others

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tier(self) -> str:
        return "memory" if self.data is not None else "disk"

    @property
    def nbytes(self) -> int:
        return self.data.nbytes if self.data is not None else self.file_bytes

    def describe(self) -> dict[str, Any]:
        return {"agent_id": self.agent, "entry_id": self.key, "tier": self.tier, "tokens": self.num_tokens,
                "bytes": self.nbytes, "last_use": round(self.last_use, 3), "created": round(self.created, 3)}


@dataclass(frozen=True)
class Match:
    """A lookup's answer: reuse the first `num_tokens` of `entry` (no entry: a miss)."""

    entry: Entry | None = None
    num_tokens: int = 0


MISS = Match()


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Number of leading tokens that a and b share (lists of ids or int arrays)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def preferred(entry: Entry, other: Entry | None) -> bool:
    """Resident beats on-disk; then the more recently used."""
    if other is None:
        return True
    mine, theirs = entry.data is not None or entry.pending is not None, other.data is not None or other.pending is not None
    return (mine, entry.last_use) > (theirs, other.last_use)
