"""What an entry file's header says about its entry: EntryMeta, parsed and checked field by field
(every value a string, in range), and StoredFile, a file as the index knows it. No I/O here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semcache.cache.kvdata import ENCODINGS, KV_DTYPES


class CorruptEntry(ValueError):
    """A file that does not parse, or whose content hash does not match."""


@dataclass(frozen=True)
class EntryMeta:
    """Everything the index needs about a stored entry, read from the header alone."""

    key: str
    fingerprint: str
    tenant: str
    agent: str
    named: bool
    num_tokens: int
    dtype: str  # the KV's own dtype in memory ("float32", "bfloat16", ...)
    encoding: str  # on disk: "native", "int8" or "int4"
    created: float
    last_use: float

    def to_strings(self) -> dict[str, str]:
        out = {k: str(v) for k, v in self.__dict__.items()}
        out["named"] = "1" if self.named else "0"
        return out

    @classmethod
    def from_strings(cls, meta: dict) -> "EntryMeta":
        """A header's metadata; CorruptEntry unless every field is there, a string, and in range."""
        try:
            if not all(isinstance(v, str) for v in meta.values()):
                raise TypeError("a value is not a string")
            out = cls(
                key=meta["key"], fingerprint=meta["fingerprint"], tenant=meta["tenant"],
                agent=meta["agent"], named={"1": True, "0": False}[meta["named"]],
                num_tokens=int(meta["num_tokens"]), dtype=meta["dtype"], encoding=meta["encoding"],
                created=_finite(meta["created"]), last_use=_finite(meta["last_use"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptEntry(f"bad metadata: {exc!r}") from None
        if not (out.key and out.num_tokens > 0 and out.dtype in KV_DTYPES and out.encoding in ENCODINGS):
            raise CorruptEntry("bad metadata: empty key, no tokens, or an unknown dtype or encoding")
        return out


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


@dataclass(frozen=True)
class StoredFile:
    path: Path
    meta: EntryMeta
    size: int
    tokens: np.ndarray | None = None  # read by read_meta (small); checked again by read's hash

    def clamped(self, now: float) -> "StoredFile":
        """Times after `now` (a planted file, a clock set back) become `now`: no file is pinned
        against expiry and the disk budget by a use in the future."""
        m = self.meta
        if m.created <= now and m.last_use <= now:
            return self
        return dataclasses.replace(self, meta=dataclasses.replace(m, created=min(m.created, now),
                                                                  last_use=min(m.last_use, now)))
