"""/admin/*: operations for the person running the daemon (the auth middleware requires the admin key)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta, Struct

from semcache.ops.errors import ApiError, Kind, ModelLoadError, invalid
from semcache.http.appkeys import SERVICE
from semcache.http.body import decode_body
from semcache.http.identity import DEFAULT_TENANT
from semcache.ops.tenants import tenant_id


class SwapRequest(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1)]


_swap_decoder = msgspec.json.Decoder(SwapRequest)


def routes() -> list[web.RouteDef]:
    return [
        web.post("/admin/model", swap_model),
        web.delete("/admin/tenants/{tenant}/agents", purge_tenant),
    ]


async def swap_model(request: web.Request) -> web.Response:
    """Load another model (GGUF, mlx-lm folder or HF id); 400 and the old model stays if it fails."""
    service = request.app[SERVICE]
    service.require_loaded()
    body = decode_body(await request.read(), _swap_decoder)
    try:
        seconds = await service.swap_model(body.model)
    except ModelLoadError as exc:
        raise invalid(f"the model was not swapped: {exc}", param="model") from None
    except ApiError:  # a shutdown that stopped the swap says so itself
        raise
    except Exception as exc:  # any load failure leaves the old model serving
        raise ApiError(Kind.INVALID_REQUEST, f"the model was not swapped: {exc}", param="model") from None
    info = service.info
    return web.json_response({"model": info.model_id, "path": info.path, "fingerprint": info.fingerprint,
                              "seconds": round(seconds, 3)})


async def purge_tenant(request: web.Request) -> web.Response:
    """Delete every cached entry of a tenant (by name; a bare key's tenant is named by the key).
    `default` also names the callers without a key (no API keys configured), stored unhashed."""
    service = request.app[SERVICE]
    name = request.match_info["tenant"]
    if not service.has_cache:
        raise invalid("the agent cache is disabled (cache_enabled = false)")
    ids = [tenant_id(name)] + ([DEFAULT_TENANT] if name == DEFAULT_TENANT else [])
    deleted = sum([await service.purge_tenant(t) for t in ids])
    return web.json_response({"tenant": name, "deleted": deleted})
