"""What GET /v1/status reports of the layers below: the model, the queue, the agent cache's tiers
against their budgets and its agents, for one tenant or (tenant None: the admin's view) for all."""

from __future__ import annotations

from typing import TYPE_CHECKING

from semcache.cache.index import AgentCache
from semcache.cache.ledger import Ledger

if TYPE_CHECKING:
    from semcache.service.service import Service


def snapshot(service: Service, tenant: str | None) -> dict:
    """The daemon's state as `tenant` may see it (None: every tenant, each agent naming its own)."""
    info = service.info
    return {
        "model": {"id": info.model_id, "fingerprint": info.fingerprint} if info else None,
        "loaded": service.loaded,
        "queue_depth": service.num_waiting,
        "active": service.num_running,
        "tiers": tiers(service.cache, tenant),
        "agents": agents(service.cache, tenant),
    }


def tiers(cache: AgentCache | None, tenant: str | None) -> dict:
    """Bytes and entries per tier against the budget the scope has (a tenant's share, if set)."""
    if cache is None:
        return {}
    limits = cache.limits

    def tier(ledger: Ledger, budget: int, total: int | None = None) -> dict:
        share = limits.share(budget) if tenant is not None else None
        entries = len(ledger) if tenant is None else len(ledger.of(tenant))
        used = total if tenant is None and total is not None else ledger.bytes_of(tenant)
        return {"bytes": used, "entries": entries, "budget": budget if share is None else share}

    # The disk total also counts other models' files and replaced files not yet deleted (as /metrics does).
    return {"memory": tier(cache.resident, limits.memory_budget),
            "disk": tier(cache.disk.stored, limits.disk_budget, cache.disk.bytes)}


def agents(cache: AgentCache | None, tenant: str | None) -> list[dict]:
    """One row per agent (an anonymous entry is its own row), most recently used first: its tier
    (memory if any entry is resident), the longest entry's tokens, all its bytes, its last use."""
    if cache is None:
        return []
    rows: dict[tuple[str, str], dict] = {}
    for entry in cache.entries.values() if tenant is None else cache.entries.of(tenant):
        row = rows.setdefault((entry.tenant, entry.agent), {
            "agent_id": entry.agent, "named": entry.named, "tier": "disk", "entries": 0, "tokens": 0,
            "bytes": 0, "last_use": 0.0, **({"tenant": entry.tenant} if tenant is None else {})})
        row["entries"] += 1
        row["tokens"] = max(row["tokens"], entry.num_tokens)
        row["bytes"] += entry.nbytes
        row["last_use"] = round(max(row["last_use"], entry.last_use), 3)
        if entry.tier == "memory":
            row["tier"] = "memory"
    return sorted(rows.values(), key=lambda row: -row["last_use"])
