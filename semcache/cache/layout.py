"""The running model's KV layout, and the check that keeps any other KV away from MLX.

A stored entry reaches the engine only if its tensors are exactly what this model's KV of that many
tokens is: the model's layer count, and per layer its kv heads, key and value head dims, in its
dtype (or that quantized). The layout comes from the model at load (engine/models.py, in ModelInfo);
the disk tier checks a file's tensor table at start (header only) and the arrays it reads, and the
engine checks a hit's KV again before it copies it in. No MLX here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from semcache.cache.entryfile import ST_DTYPES, CorruptEntry, EntryMeta
from semcache.cache.kvdata import GROUP, KVData

Table = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)
_KV_ST = {"float32": "F32", "float16": "F16", "bfloat16": "U16"}  # bfloat16 is stored as its bits


@dataclass(frozen=True)
class KVLayout:
    """Per layer (kv heads, key head dim, value head dim), and the KV's dtype."""

    layers: tuple[tuple[int, int, int], ...]
    dtype: str

    def table(self, num_tokens: int, encoding: str = "native") -> Table:
        """The tensors an entry of `num_tokens` tokens holds in `encoding` (as KVData.to_tensors writes them)."""
        out = {"tokens": ("I32", (num_tokens,))}
        for i, (heads, key_dim, value_dim) in enumerate(self.layers):
            for name, dim in (("keys", key_dim), ("values", value_dim)):
                shape = (1, heads, num_tokens)
                if encoding == "native":
                    out[f"layers.{i}.{name}"] = (_KV_ST.get(self.dtype, "?"), shape + (dim,))
                    continue
                if dim % GROUP:
                    raise CorruptEntry(f"head dim {dim} cannot be stored as {encoding}")
                out[f"layers.{i}.{name}.q"] = ("U8", shape + (dim if encoding == "int8" else dim // 2,))
                out[f"layers.{i}.{name}.scales"] = ("F32", shape + (dim // GROUP,))
                out[f"layers.{i}.{name}.biases"] = ("F32", shape + (dim // GROUP,))
        return out

    def check(self, found: Table, meta: EntryMeta) -> None:
        """CorruptEntry unless `found` (a file's tensors) is this model's KV of the entry's tokens."""
        if meta.dtype != self.dtype:
            raise CorruptEntry(f"KV of dtype {meta.dtype}; the model's is {self.dtype}")
        want = self.table(meta.num_tokens, meta.encoding)
        if found != want:
            name = next((n for n in [*want, *found] if found.get(n) != want.get(n)))
            raise CorruptEntry(f"tensor {name!r} is {found.get(name)}; this model's would be {want.get(name)}")

    def check_header(self, meta: EntryMeta, header: dict[str, Any]) -> None:
        """check() from a safetensors header's tensor table (no data read)."""
        try:
            found = {name: (spec["dtype"], tuple(spec["shape"])) for name, spec in header.items()
                     if name != "__metadata__"}
        except (KeyError, TypeError) as exc:
            raise CorruptEntry(f"bad tensor table: {exc!r}") from None
        self.check(found, meta)

    def fits(self, data: KVData) -> bool:
        """Whether KV in memory (a hit handed to the engine) has this layout."""
        found = tensor_table(data.to_tensors(np.zeros(data.num_tokens, np.int32)))
        return data.dtype == self.dtype and found == self.table(data.num_tokens)


def tensor_table(tensors: dict[str, np.ndarray]) -> Table:
    """The table of arrays read from a file, to check()."""
    return {name: (ST_DTYPES.get(a.dtype.name, "?"), a.shape) for name, a in tensors.items()}
