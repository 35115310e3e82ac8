"""One sequence's KV cache as plain numpy arrays, and its encodings on disk (lossless, 8-bit, 4-bit).

The MLX thread turns a finished row's cache into a KVData (one copy) and a hit's KVData back into
MLX arrays (one copy), so a stored entry is never mutated by a running sequence. Between those two
points nothing needs MLX: the index, the budgets and the disk I/O run on other threads.
bfloat16 (no numpy dtype) is kept as its raw uint16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENCODINGS = ("native", "int8", "int4")
KV_DTYPES = ("float32", "float16", "bfloat16")  # a model's KV in memory (bfloat16 kept as uint16 bits)
GROUP = 32  # quantization group along head_dim (mlx-lm's KV quantization uses 32 or 64)


@dataclass(frozen=True)
class KVData:
    """Per layer (keys, values), each [1, kv_heads, tokens, head_dim]; `dtype` is the model's."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    dtype: str

    @property
    def num_tokens(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    @property
    def quantizable(self) -> bool:
        """int8/int4 on disk need head_dim in whole groups (else the entry is written losslessly)."""
        return bool(self.layers) and all(a.shape[-1] % GROUP == 0 for pair in self.layers for a in pair)

    def to_tensors(self, tokens: np.ndarray, encoding: str = "native") -> dict[str, np.ndarray]:
        """Named arrays for a safetensors file: token ids, then each layer's keys and values."""
        out = {"tokens": np.ascontiguousarray(tokens, dtype=np.int32)}
        for i, (k, v) in enumerate(self.layers):
            for name, a in (("keys", k), ("values", v)):
                if encoding == "native":
                    out[f"layers.{i}.{name}"] = a
                else:
                    q, scales, biases = _quantize(_as_float32(a, self.dtype), 8 if encoding == "int8" else 4)
                    out[f"layers.{i}.{name}.q"] = q
                    out[f"layers.{i}.{name}.scales"] = scales
                    out[f"layers.{i}.{name}.biases"] = biases
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], dtype: str, encoding: str) -> tuple[np.ndarray, "KVData"]:
        """Inverse of to_tensors: (token ids, KVData in the model's dtype)."""
        layers = []
        i = 0
        while f"layers.{i}.keys" in tensors or f"layers.{i}.keys.q" in tensors:
            pair = []
            for name in ("keys", "values"):
                if encoding == "native":
                    pair.append(tensors[f"layers.{i}.{name}"])
                else:
                    base = f"layers.{i}.{name}"
                    full = _dequantize(tensors[base + ".q"], tensors[base + ".scales"],
                                       tensors[base + ".biases"], 8 if encoding == "int8" else 4)
                    pair.append(_from_float32(full, dtype))
            layers.append(tuple(pair))
            i += 1
        return tensors["tokens"], cls(tuple(layers), dtype)

    def prefix(self, n: int) -> "KVData":
        """The first n tokens (views, no copy)."""
        return KVData(tuple((k[:, :, :n, :], v[:, :, :n, :]) for k, v in self.layers), self.dtype)


def _as_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _from_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # round to nearest even, keep the top 16 bits
        bits = a.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return a.astype(np.dtype(dtype))


def _quantize(a: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine quantization per GROUP values of the last axis: a ≈ q * scale + bias."""
    shape = a.shape
    groups = a.reshape(*shape[:-1], shape[-1] // GROUP, GROUP)
    low = groups.min(axis=-1, keepdims=True)
    high = groups.max(axis=-1, keepdims=True)
    levels = (1 << bits) - 1
    scale = np.where(high > low, (high - low) / levels, 1.0).astype(np.float32)
    q = np.clip(np.rint((groups - low) / scale), 0, levels).astype(np.uint8).reshape(shape)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale[..., 0], low[..., 0].astype(np.float32)


def _dequantize(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:-1], q.shape[-1] * 2)
    groups = q.reshape(*q.shape[:-1], q.shape[-1] // GROUP, GROUP).astype(np.float32)
    full = groups * scales[..., None] + biases[..., None]
    return full.reshape(q.shape).astype(np.float32)
