"""Who is asking: the tenant (the API key in use), the agent (X-Agent-ID, X-Session-ID, or the
client's own session headers) and how urgent the request is."""

from __future__ import annotations

import re

from aiohttp import web

from semcache.ops.errors import ApiError, Kind, invalid
from semcache.http.appkeys import CONFIG
from semcache.http.body import parse_priority
from semcache.service.service import ANON, hit_type

TENANT = "tenant"  # request key, set by the auth middleware: the tenant's id (tenants.tenant_id)
KEY = "key_id"  # request key: which API key was used (tenants.key_id), for rate limits and logs
ADMIN = "admin"  # request key: True when the admin key was given
USAGE = "usage"  # request key: token counts and TTFT for the access log
ADMITTED = "admitted"  # request key: the generation's sequences, once admitted (for the cache headers)
NO_AGENT = "anonymous"  # x-semcache-agent (and /v1/status) for a request that named no agent
ANONYMOUS = "anonymous"  # the rate-limit key of callers without an API key
DEFAULT_TENANT = "default"  # every caller, when no api_keys are configured
DEFAULT_PRIORITY = 5  # lower values are more urgent; below this needs the admin key (with auth on)
AGENT_HEADERS = ("X-Agent-ID", "X-Session-ID")
# Claude Code names its sessions and subagents itself; these count only when neither header above is
# sent, a subagent's id before its session's, and one that is not a valid agent id is ignored.
CLIENT_AGENT_HEADERS = ("x-claude-code-agent-id", "x-claude-code-session-id")
# x-claude-code-request-class: titles, classifiers and summaries are served after main traffic.
REQUEST_CLASS_HEADER = "x-claude-code-request-class"
BACKGROUND_CLASSES = frozenset({"auxiliary", "compaction"})
BACKGROUND_PRIORITY = 7  # after the default 5; still before the least urgent (9)
# Sent with the first request after Claude Code compacted a conversation: the old branch is dead.
COMPACTED_HEADER = "x-claude-code-context-compacted"
MAX_AGENT_ID = 128
_AGENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")


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
    if given:
        header, value = next(iter(given.items()))
        return tenant, check_agent_id(value, header)
    for header in CLIENT_AGENT_HEADERS:
        value = request.headers.get(header, "").strip()
        if value and len(value) <= MAX_AGENT_ID and _AGENT_RE.fullmatch(value) and not value.startswith(ANON):
            return tenant, value
    return tenant, None


def caller(request: web.Request, body_priority: int | None) -> dict:
    """The Generation fields both dialects read from the request alike: who is asking (tenant,
    agent, whose rate limit), how urgent it is, and the client's lifecycle hints."""
    tenant, agent = identity(request)
    return {"tenant": tenant, "agent": agent, "priority": priority(request, body_priority),
            "rate_key": rate_key(request), "background": is_background(request), "fresh_start": compacted(request)}


def compacted(request: web.Request) -> bool:
    """The client has just compacted this agent's context (x-claude-code-context-compacted)."""
    return request.headers.get(COMPACTED_HEADER, "").strip().lower() not in ("", "0", "false")


def is_background(request: web.Request) -> bool:
    """A client's own side request (Claude Code: titles, classifiers, compaction summaries)."""
    return request.headers.get(REQUEST_CLASS_HEADER, "").strip().lower() in BACKGROUND_CLASSES


def priority(request: web.Request, body_value: int | None) -> int:
    """X-Priority (or the body's `priority`), 0-9; with API keys or an admin key configured, values
    below the default need the admin key, so no tenant can jump the queue."""
    default = BACKGROUND_PRIORITY if is_background(request) else DEFAULT_PRIORITY
    value = parse_priority(request.headers.get("X-Priority"), body_value, default)
    guarded = request.get(KEY) is not None or bool(request.app[CONFIG].admin_key)
    if value < DEFAULT_PRIORITY and guarded and not request.get(ADMIN):
        raise ApiError(Kind.PERMISSION, f"priorities below {DEFAULT_PRIORITY} need the admin key (got {value})")
    return value


def note_admitted(request: web.Request, seqs: list) -> None:
    """The generation is admitted: its cache hit is known, so its response headers can say it. The
    tier is taken now (a sequence resumed after a preemption may reload its own KV from disk)."""
    request[ADMITTED] = (seqs, hit_type(seqs[0]))


def _hit(request: web.Request, seq) -> str:
    """The hit type at admission; `miss` if the engine since refused the hit and ran it cold."""
    admitted = request.get(ADMITTED)
    kind = admitted[1] if admitted is not None else hit_type(seq)
    return kind if seq.num_cached_tokens else "miss"


def cache_headers(request: web.Request) -> dict[str, str]:
    """x-semcache-cache (memory, disk or miss), -cached-tokens and -agent of an admitted generation
    (none for other routes); set when the response is prepared, so a stream has them too."""
    if ADMITTED not in request:
        return {}
    first = request[ADMITTED][0][0]
    return {"x-semcache-cache": _hit(request, first), "x-semcache-cached-tokens": str(first.num_cached_tokens),
            "x-semcache-agent": first.agent or NO_AGENT}


def note_usage(request: web.Request, seqs: list) -> None:
    """Token counts, cache reuse and TTFT of a finished generation, for the access log line."""
    first = seqs[0]
    request[USAGE] = {
        "agent": first.agent,
        "prompt_tokens": first.num_prompt_tokens,
        "cached_tokens": first.num_cached_tokens,
        "output_tokens": sum(s.num_output_tokens for s in seqs),
        "cache": _hit(request, first),
        "ttft_ms": round((first.first_token_at - first.arrival) * 1000, 1) if first.first_token_at else None,
    }


def rate_key(request: web.Request) -> str:
    """Whose rate-limit buckets a request draws from: its API key's, or the shared anonymous ones."""
    return request.get(KEY) or ANONYMOUS
