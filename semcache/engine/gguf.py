"""GGUF files (llama family): weights renamed to mlx-lm's llama, tokenizer rebuilt from metadata.

Measured on the embedded SmolLM2 GGUF: Q4_1/Q8_0 tensors load as MLX-quantized triples (group size 32),
q/k are permuted for interleaved RoPE (so rope_traditional=True), embeddings may be tied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from semcache.ops.errors import ModelLoadError

# For GGUF files that carry no template: ChatML, which most instruction-tuned small models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

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


def _meta_int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    if key not in meta:
        if default is None:
            raise ModelLoadError(f"GGUF metadata lacks {key}")
        return default
    return int(meta[key].item())


def load_gguf(path: Path, backend: str):
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
    wrapped.chat_template = str(meta.get("tokenizer.chat_template") or CHATML_TEMPLATE)
    return wrapped


