"""Who is asking: the tenant (the API key in use) and the agent (X-Agent-ID, or X-Session-ID)."""

from __future__ import annotations

import hashlib
import re

from aiohttp import web

from semcache.errors import invalid
from semcache.kvcache import ANON

TENANT = "tenant"  # request key, set by the auth middleware
DEFAULT_TENANT = "default"  # every caller, when no api_keys are configured
AGENT_HEADERS = ("X-Agent-ID", "X-Session-ID")
MAX_AGENT_ID = 128
_AGENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")


def tenant_of(api_key: str) -> str:
    """A stable tenant id that is not the key itself (it is written into cache files)."""
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:16]


def check_agent_id(value: str, where: str, anon_ok: bool = False) -> str:
    """The agent id, or a 400 naming `where` (a header or the URL path)."""
    if len(value) > MAX_AGENT_ID or not _AGENT_RE.fullmatch(value):
        raise invalid(
            f"{where} must be 1-{MAX_AGENT_ID} characters: letters, digits and '.', '_', ':', '@', '-', "
            f"starting with a letter or digit (got {value[:160]!r})", param=where)
    if value.startswith(ANON) and not anon_ok:
        raise invalid(f"{where}: ids starting with '{ANON}' name anonymous cache entries", param=where)
    return value


def identity(request: web.Request) -> tuple[str, str | None]:
    """(tenant, agent id or None) for a generation request."""
    tenant = request.get(TENANT, DEFAULT_TENANT)
    given = {h: request.headers[h].strip() for h in AGENT_HEADERS if h in request.headers}
    if len(set(given.values())) > 1:
        raise invalid("X-Agent-ID and X-Session-ID name different agents; send one", param="X-Agent-ID")
    if not given:
        return tenant, None
    header, value = next(iter(given.items()))
    return tenant, check_agent_id(value, header)
