"""LiteLLM against semcache's Anthropic route (`litellm.anthropic.messages`), on the embedded model:
the cases of LiteLLM's own base_anthropic_messages_test (basic, streaming, content blocks as
dicts, the router's streaming usage logging), a 400 for malformed `messages` streamed and not, and
a two-turn run with a declared tool whose second turn reads the first from cache. Its thinking
cases are left out: the embedded model does not reason. Its cost check is left out too: LiteLLM
prices only models it knows, and a local model costs nothing."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from semcache.http.app import make_app
from semcache.ops.config import Config
from tests.conftest import serve_in_thread

pytestmark = pytest.mark.model

JOKE = [{"role": "user", "content": "Hello, can you tell me a short joke?"}]
WEATHER_TOOL = {"name": "get_weather", "description": "Get the current weather in a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list
    import litellm

    return litellm


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    with serve_in_thread(make_app(Config(cache_dir=str(tmp_path_factory.mktemp("cache"))))) as url:
        yield {"model": "anthropic/local", "api_base": url, "api_key": "local"}


def create(litellm, config, **kwargs):
    return asyncio.run(litellm.anthropic.messages.acreate(**config, **kwargs))


def events(chunks: list) -> list[dict]:
    """The SSE events of a streamed answer, however LiteLLM split it into chunks."""
    raw = b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks)
    return [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: ")]


def streamed(litellm, config, **kwargs) -> list[dict]:
    async def go():
        return [c async for c in await litellm.anthropic.messages.acreate(**config, stream=True, **kwargs)]
    return events(asyncio.run(go()))


def test_non_streaming(litellm, config):
    response = create(litellm, config, messages=JOKE, max_tokens=40)
    assert isinstance(response, dict)
    assert response["id"] and response["model"] and response["role"] == "assistant"
    assert response["content"] and response["usage"]["output_tokens"] > 0


def test_streaming(litellm, config):
    got = streamed(litellm, config, messages=JOKE, max_tokens=40)
    kinds = [e["type"] for e in got]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds and "message_delta" in kinds
    text = "".join(e["delta"].get("text", "") for e in got if e["type"] == "content_block_delta")
    assert text.strip()


def test_content_blocks_are_dicts(litellm, config):
    response = create(litellm, config, messages=[{"role": "user", "content": "Say hi"}], max_tokens=40)
    block = response["content"][0]
    assert isinstance(block, dict) and block["type"] == "text" and isinstance(block["text"], str)


def test_router_streaming_logs_the_usage_it_streamed(litellm, config):
    """The router's success log carries the messages and the token counts the stream reported."""
    from litellm.integrations.custom_logger import CustomLogger

    asked = [{"role": "user", "content": "Tell me a short joke about routers."}]

    class Logged(CustomLogger):  # LiteLLM's logging worker may still deliver earlier tests' events
        payload = None

        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            payload = kwargs.get("standard_logging_object") or {}
            if payload.get("messages") == asked:
                Logged.payload = payload

    router = litellm.Router(model_list=[{"model_name": "semcache-alias", "litellm_params": dict(config)}])
    saved, litellm.callbacks = litellm.callbacks, [Logged()]
    try:
        async def go():
            chunks = [c async for c in await router.aanthropic_messages(
                messages=asked, model="semcache-alias", max_tokens=40, stream=True)]
            for _ in range(100):  # the logger runs after the stream, as a task of its own
                if Logged.payload is not None:
                    break
                await asyncio.sleep(0.05)
            return events(chunks)
        got = asyncio.run(go())
    finally:
        litellm.callbacks = saved
    kinds = [e.get("type") for e in got]
    assert "message_start" in kinds and "message_delta" in kinds, got  # say what came, if not the answer
    usage = got[kinds.index("message_start")]["message"]["usage"] | got[kinds.index("message_delta")]["usage"]
    assert Logged.payload is not None
    assert Logged.payload["response"] is not None
    assert Logged.payload["prompt_tokens"] == usage["input_tokens"]
    assert Logged.payload["completion_tokens"] == usage["output_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("messages", [[{"role": "user"}], [{"role": "wizard", "content": "Hi"}], [{"role": "user", "content": 7}]],
                         ids=["no-content", "bad-role", "content-not-text"])
def test_malformed_messages_get_a_400(litellm, config, messages, stream):
    async def go():
        answer = await litellm.anthropic.messages.acreate(**config, messages=messages, max_tokens=16, stream=stream)
        if stream:
            [c async for c in answer]
    with pytest.raises(litellm.BadRequestError) as caught:
        asyncio.run(go())
    assert caught.value.status_code == 400
    assert '"invalid_request_error"' in str(caught.value) and "messages[0]" in str(caught.value)


def test_two_turns_with_a_tool_read_turn_one_from_cache(litellm, config):
    """Turn 1 must call the declared tool (tool_choice any); turn 2 sends its result back and
    reads everything turn 1 had as prompt from cache."""
    headers = {"X-Agent-ID": "litellm-weather"}
    first = create(litellm, config, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                   tools=[WEATHER_TOOL], tool_choice={"type": "any"}, max_tokens=64, temperature=0,
                   extra_headers=headers)
    call = next(b for b in first["content"] if b["type"] == "tool_use")
    assert first["stop_reason"] == "tool_use" and call["name"] == "get_weather" and "city" in call["input"]
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": first["content"]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "Sunny, 24 C"}]}]
    second = create(litellm, config, messages=history, tools=[WEATHER_TOOL], max_tokens=48, temperature=0,
                    extra_headers=headers)
    assert second["content"]
    assert second["usage"]["cache_read_input_tokens"] >= first["usage"]["input_tokens"] > 0
