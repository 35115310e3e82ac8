"""/v1/agents: list, inspect, delete, evict and warm an agent's cached KV (scoped to the tenant)."""

from __future__ import annotations

from typing import Annotated, Union

import msgspec
from aiohttp import web
from msgspec import Meta, Struct

from semcache.http import anthropic, openai
from semcache.ops.errors import ApiError, Kind, invalid
from semcache.http.dialect import sends_anthropic_version
from semcache.http.identity import DEFAULT_TENANT, TENANT, check_agent_id, rate_key
from semcache.http.appkeys import SERVICE
from semcache.http.body import decode_body
from semcache.service.service import FinishReason, Generation, SamplingParams, Service, failure


class AnthropicWarm(Struct, kw_only=True):
    model: Union[str, None] = None
    system: Union[str, list[anthropic.TextBlock], None] = None
    messages: list[anthropic.Message] = []
    tools: Union[list[dict], None] = None  # rendered into the prompt, so the warmed entry matches
    tool_choice: Union[dict, None] = None


class OpenAIWarm(Struct, kw_only=True):
    model: Union[str, None] = None
    messages: Annotated[list[openai.Message], Meta(min_length=1)]
    tools: Union[list[dict], None] = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool = True


class DialectProbe(Struct):
    """Only whether a top-level `system` is present (Raw: its value is not decoded)."""

    system: msgspec.Raw = msgspec.Raw()


_dialect_probe = msgspec.json.Decoder(DialectProbe)
_anthropic_warm = msgspec.json.Decoder(AnthropicWarm)
_openai_warm = msgspec.json.Decoder(OpenAIWarm)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/agents", list_agents),
        web.get("/v1/agents/{agent_id}", get_agent),
        web.delete("/v1/agents/{agent_id}", delete_agent),
        web.post("/v1/agents/{agent_id}/evict", evict_agent),
        web.post("/v1/agents/{agent_id}/warm", warm_agent),
    ]


def _scope(request: web.Request, anon_ok: bool = True) -> tuple[Service, str, str | None]:
    service = request.app[SERVICE]
    agent = request.match_info.get("agent_id")
    if agent is not None:
        agent = check_agent_id(agent, "agent_id", anon_ok=anon_ok)
    return service, request.get(TENANT, DEFAULT_TENANT), agent


def _not_found(agent: str) -> ApiError:
    return ApiError(Kind.NOT_FOUND, f"no cached entries for agent '{agent}'")


async def list_agents(request: web.Request) -> web.Response:
    service, tenant, _ = _scope(request)
    entries = service.agents(tenant)
    return web.json_response({"object": "list", "data": [e.describe() for e in entries]})


async def get_agent(request: web.Request) -> web.Response:
    service, tenant, agent = _scope(request)
    entries = service.agents(tenant, agent)
    if not entries:
        raise _not_found(agent)
    return web.json_response(_agent_body(agent, entries))


def _agent_body(agent: str, entries: list) -> dict:
    return {
        "agent_id": agent,
        "tokens": max(e.num_tokens for e in entries),
        "bytes": sum(e.nbytes for e in entries),
        "entries": [e.describe() for e in entries],
    }


async def delete_agent(request: web.Request) -> web.Response:
    service, tenant, agent = _scope(request)
    count = await service.delete_agent(tenant, agent)
    if not count:
        raise _not_found(agent)
    return web.json_response({"agent_id": agent, "deleted": True, "entries": count})


async def evict_agent(request: web.Request) -> web.Response:
    service, tenant, agent = _scope(request)
    entries = await service.evict_agent(tenant, agent)
    if not entries:
        raise _not_found(agent)
    return web.json_response(_agent_body(agent, entries))


async def warm_agent(request: web.Request) -> web.Response:
    """Prefill and store a conversation without generating (an Anthropic or OpenAI messages body)."""
    service, tenant, agent = _scope(request, anon_ok=False)
    if not service.has_cache:
        raise invalid("the agent cache is disabled (cache_enabled = false)")
    messages, tools = _warm_messages(request, await request.read())
    gen = Generation(messages=messages, max_tokens=0, sampling=SamplingParams(temperature=0.0),
                     tenant=tenant, agent=agent, rate_key=rate_key(request), tools=tuple(tools))
    ticket = await service.start(gen, warm=True)
    seq = ticket.seq
    try:
        await seq.text()
        if seq.finished.reason is not FinishReason.LENGTH:
            raise failure(seq.finished)
        entry = await ticket.stored
    finally:
        service.release(ticket)
    if entry is None and service.deleted(ticket):  # deletion wins
        raise ApiError(Kind.CONFLICT, f"agent '{agent}' was deleted while it was being warmed; nothing was stored")
    if entry is None:
        raise ApiError(Kind.INTERNAL, "the prompt was prefilled but could not be stored")
    return web.json_response({
        "agent_id": agent,
        "tokens": seq.num_prompt_tokens,
        "cached_tokens": seq.num_cached_tokens,
        "prefilled_tokens": seq.num_prompt_tokens - seq.num_cached_tokens,
        "entry": entry.describe(),
    })


def _warm_messages(request: web.Request, raw: bytes) -> tuple[list, list]:
    """Messages and tools: Anthropic dialect with an anthropic-version header or a top-level
    `system`; else OpenAI."""
    if sends_anthropic_version(request) or decode_body(raw, _dialect_probe).system:
        body = decode_body(raw, _anthropic_warm)
        if not body.messages and not body.system:
            raise invalid("nothing to warm: give a system prompt or messages", param="messages")
        return anthropic.chat_messages(body), anthropic.parse_tools(body)[0]
    body = decode_body(raw, _openai_warm)
    return openai.chat_messages(body), openai.parse_tools(body)[0]
