"""API keys and the tenants they belong to; keys are compared in constant time and never logged."""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

log = logging.getLogger("semcache.auth")


def tenant_id(name: str) -> str:
    """The id a tenant's cache entries are stored under: a hash, so files never hold a name or key."""
    return "t-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def key_id(key: str) -> str:
    """A stable, non-reversible handle for one key (rate-limit buckets, logs)."""
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:12]


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
        keys[key] = tenant
    return keys


class KeyRing:
    """The accepted keys: config `api_keys` (each its own tenant) plus `api_keys_file`."""

    def __init__(self, keys: list[str], file: str | None = None):
        self._static = {k: k for k in keys}
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
        loaded = parse_keys_file(path.read_text(), str(path))
        self._keys = {**self._static, **loaded}
        log.info("API keys loaded: %d keys, %d tenants", len(self._keys), len(set(self._keys.values())))

    def tenant(self, given: str) -> str | None:
        """The tenant name of `given`, or None; compares with every key so timing reveals nothing."""
        found = None
        for key, tenant in self._keys.items():
            if hmac.compare_digest(given.encode(), key.encode()):
                found = tenant
        return found
