"""The scheduler's budgets: how many run, how much KV they may hold, how many wait and how long."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from semcache.ops.config import Config

__all__ = ["Limits", "TooLarge"]


class TooLarge(ValueError):
    """The request can never run here (context or KV budget); a client error, not overload."""


@dataclass(frozen=True)
class Limits:
    max_active: int = 16
    kv_budget: int = 4 << 30
    kv_grow_tokens: int = 256
    max_queue: int = 256
    max_queue_wait: float = 120.0
    stream_buffer: int = 4096
    batch_wait: float = 0.01

    @classmethod
    def from_config(cls, config: Config) -> "Limits":
        """The limits a daemon's configuration sets (its keys of the same names)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})
