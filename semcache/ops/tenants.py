"""API keys and the tenants they belong to; keys are compared in constant time and never logged."""

from __future__ import annotations

import hashlib
import hmac
import logging
import unicodedata
from pathlib import Path

log = logging.getLogger("semcache.auth")


def tenant_id(name: str) -> str:
    """The id a tenant's cache entries are stored under: a hash, so files never hold a name or key."""
    return "t-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def key_id(key: str) -> str:
    """A stable, non-reversible handle for one key (rate-limit buckets, logs)."""
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def check_name(text: str, where: str) -> str:
    """A key or tenant name, or a ValueError: never empty (an empty key would turn auth off or
    match an empty header) and free of control characters, so no tenant can take the name the
    daemon gives its own admin tenant (which starts with NUL)."""
    if not text:
        raise ValueError(f"{where}: an empty key (for no keys leave it unset; a stray comma in SEMCACHE_API_KEYS?)")
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise ValueError(f"{where}: a key or tenant name holds a control character")
    return text


def parse_keys_file(text: str, source: str) -> dict[str, str]:
    """`tenant:key` or bare `key` per line (# comments, blank lines ignored) -> {key: tenant name}.
    A bare key is its own tenant, so rotating it orphans its caches; name a tenant to keep them."""
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, key = line.partition(":")
        if not sep:
            tenant, key = line, line
        tenant, key = tenant.strip(), key.strip()
        if not key or not tenant:
            raise ValueError(f"{source}:{number}: expected 'tenant:key' or 'key'")
        keys[check_name(key, f"{source}:{number}")] = check_name(tenant, f"{source}:{number}")
    return keys


class KeyRing:
    """The accepted keys: config `api_keys` (each its own tenant) plus `api_keys_file`. Keys
    configured but none in force (an empty entry, a file of only comments) is a ValueError, at
    start and on reload: it would turn auth off."""

    def __init__(self, keys: list[str], file: str | None = None):
        self._static = {check_name(k, "api_keys"): k for k in keys}
        self.file = file
        self._keys = dict(self._static)
        if file:
            self.reload()

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def reload(self) -> None:
        """Re-read the keys file (SIGHUP); on any error the previous keys stay and it raises."""
        if not self.file:
            return
        path = Path(self.file).expanduser()
        keys = {**self._static, **parse_keys_file(path.read_text(), str(path))}
        if not keys:
            raise ValueError(f"{path} has no keys (only comments or blank lines), which would turn "
                             "authentication off: add a key, or unset api_keys_file")
        self._keys = keys
        log.info("API keys loaded: %d keys, %d tenants", len(self._keys), len(set(self._keys.values())))

    def tenant(self, given: str) -> str | None:
        """The tenant name of `given`, or None; compares with every key so timing reveals nothing."""
        found = None
        for key, tenant in self._keys.items():
            if hmac.compare_digest(given.encode(), key.encode()):
                found = tenant
        return found
