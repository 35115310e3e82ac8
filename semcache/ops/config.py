"""Config: one frozen Struct; defaults < TOML file < SEMCACHE_* env < command-line flags.

Unknown keys are an error that names the key, wherever they come from. Sizes accept bytes or
strings such as "4GiB"; lists accept TOML arrays or comma-separated env values.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import msgspec
from msgspec import Meta

ENV_PREFIX = "SEMCACHE_"

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_SIZE_KEYS = ("kv_budget", "max_body", "cache_memory_budget", "cache_disk_budget")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_LIST_KEYS = ("api_keys", "trusted_proxies")

Positive = Annotated[int, Meta(ge=1)]
Seconds = Annotated[float, Meta(gt=0)]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the source."""


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    model: str | None = None
    cache_dir: str = "~/.cache/semcache"
    max_active: Positive = 16
    kv_budget: Positive = 4 << 30
    # KV is reserved this many tokens ahead of each sequence, not for all it may generate.
    kv_grow_tokens: Positive = 256
    max_queue: Positive = 256
    max_queue_wait: Seconds = 120.0
    prefill_chunk: Positive = 256
    # Prompt-lookup speculative decoding (greedy output unchanged, a seed's sampled output unchanged):
    # drafts of up to speculative_max_draft tokens from the sequence's own prompt and output, verified
    # only when the measured step cost says it pays (on by default: `python -m perf spec` never lost).
    speculative: Literal["off", "prompt_lookup"] = "prompt_lookup"
    speculative_max_draft: Annotated[int, Meta(ge=1, le=16)] = 5
    default_max_tokens: Positive = 1024
    # An operator ceiling on the output a request may ask for (Claude Code asks for 32,000); unset:
    # only the context window limits it.
    max_output_tokens: Positive | None = None
    max_body: Positive = 32 << 20
    stream_buffer: Positive = 4096
    batch_wait: Annotated[float, Meta(ge=0, le=1)] = 0.01
    backlog: Positive = 1024
    api_keys: list[str] = []
    # One `tenant:key` (or bare `key`) per line; re-read on SIGHUP. Keys are never logged.
    api_keys_file: str | None = None
    # Guards /admin/* and priorities below default_priority; unset: /admin/* is 404.
    admin_key: str | None = None
    # Binding anything but a loopback address without API keys needs this set explicitly.
    allow_unauthenticated: bool = False
    # Serve /metrics without an API key (for a Prometheus on a private network).
    metrics_public: bool = False
    # The scraper's own key: once set, /metrics takes it or the admin key, never a tenant key.
    metrics_key: str | None = None
    # Proxies (IPs or CIDRs) whose X-Forwarded-For names the client; unset: the header is ignored.
    trusted_proxies: list[str] = []
    # Token buckets per key (requests and prompt+max_tokens per minute) and for all keys together.
    rate_limit_rpm: Annotated[int, Meta(ge=1)] | None = None
    rate_limit_tpm: Annotated[int, Meta(ge=1)] | None = None
    rate_limit_global_rpm: Annotated[int, Meta(ge=1)] | None = None
    # SIGTERM: seconds running requests may take to finish before they are ended.
    drain_timeout: Annotated[float, Meta(ge=0)] = 30.0
    # Seconds a connection may wait on its client with no byte moving (no request, a body that
    # stopped arriving, an answer not read) before it is closed; never a limit on a request's length.
    idle_timeout: Seconds = 75.0
    log_level: str = "info"
    log_format: Literal["json", "text"] = "json"
    # The agent cache (docs/DESIGN.md, "The disk-hit path"; README "Agent cache"): byte budgets per tier, entry lifetime, smallest useful hit.
    cache_enabled: bool = True
    cache_memory_budget: Annotated[int, Meta(ge=0)] = 2 << 30
    cache_disk_budget: Annotated[int, Meta(ge=0)] = 20 << 30
    cache_ttl: Seconds = 7 * 86400.0
    cache_min_prefix: Positive = 64
    cache_disk_encoding: Literal["native", "int8", "int4"] = "native"
    cache_write_through: bool = True
    # The fraction of each cache budget (memory, disk) one tenant may hold; unset: tenants share them freely.
    cache_tenant_share: Annotated[float, Meta(gt=0, le=1)] | None = None
    # Bounds on cache file work (a hung disk): a read past its timeout is a miss, a write past its
    # timeout a failed write; shutdown waits this long for file work, then abandons it.
    cache_read_timeout: Seconds = 10.0
    cache_write_timeout: Seconds = 60.0
    cache_close_timeout: Seconds = 10.0


FIELDS = frozenset(Config.__struct_fields__)


def parse_size(value: Any, key: str = "size") -> int:
    """Bytes from an int or a string like '512MiB' / '4 GB'."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE_RE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"{key}: {value!r} is not a size (try 4GiB, 512MiB or a byte count)")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_duration(value: Any, key: str = "duration") -> float:
    """Seconds from a number or a string like '90s', '15m', '12h', '7d'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION_RE.match(str(value).lower())
    if match is None:
        raise ConfigError(f"{key}: {value!r} is not a duration (try 3600, 90s, 15m, 12h or 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key == "config":  # the file's path, read by load_config
            continue
        if key not in FIELDS:
            raise ConfigError(f"unknown config key {key!r} (from environment variable {name})")
        # empty items are kept: "," must not read as no keys (the key ring refuses them)
        out[key] = [s.strip() for s in raw.split(",")] if key in _LIST_KEYS else raw
    return out


def _from_file(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    for key in data:
        if key not in FIELDS:
            raise ConfigError(f"unknown config key {key!r} (in {path})")
    return data


def load_config(
    file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults < file < env < overrides (flags; None values are ignored) into a Config."""
    environ = os.environ if environ is None else environ
    file = file or environ.get(ENV_PREFIX + "CONFIG")
    merged: dict[str, Any] = {}
    env = _from_env(environ)
    if file:
        merged.update(_from_file(file))
    merged.update(env)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key in _SIZE_KEYS:
        if key in merged:
            merged[key] = parse_size(merged[key], key)
    if "cache_ttl" in merged:
        merged["cache_ttl"] = parse_duration(merged["cache_ttl"], "cache_ttl")
    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc
