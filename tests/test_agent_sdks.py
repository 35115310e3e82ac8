"""Agent SDKs end to end on the embedded model, against a live daemon on 127.0.0.1: each run is two
turns of one agent with a declared tool; every call must be a 200 and turn 2 must read cached tokens.
LiteLLM's Anthropic route has its own file (test_litellm)."""

from __future__ import annotations

import asyncio
import json

import pytest

from semcache.http.app import make_app
from semcache.ops.config import Config
from tests.conftest import serve_in_thread

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    with serve_in_thread(make_app(Config(cache_dir=str(tmp_path_factory.mktemp("cache"))))) as url:
        yield url


def test_openai_agents_with_a_function_tool_and_an_output_type(base_url):
    """openai-agents sends `tools` and `response_format` together for an agent with a function tool
    and an output_type (vLLM refuses the pair): turn 1 calls the tool, turn 2 answers in the
    output_type, parsed by the SDK; every call is a 200 and turn 2 reads turn 1 from cache. The
    grammar for tool_choice auto ('a call or schema-valid JSON') is checked in test_tools and
    test_tool_model."""
    import agents
    import httpx2  # the openai SDK's HTTP client
    from openai import AsyncOpenAI
    from pydantic import BaseModel

    class Report(BaseModel):
        city: str
        summary: str

    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return "Sunny, 24 C"

    statuses: list[int] = []

    async def record(response):
        statuses.append(response.status_code)

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="local", max_retries=0,
                         default_headers={"X-Agent-ID": "openai-agents-weather"},
                         http_client=httpx2.AsyncClient(event_hooks={"response": [record]}))
    agents.set_tracing_disabled(True)
    settings = agents.ModelSettings(temperature=0, max_tokens=96, parallel_tool_calls=False)
    agent = agents.Agent(
        name="weather", tools=[get_weather], instructions="Report the weather as JSON.", output_type=Report,
        model=agents.OpenAIChatCompletionsModel(model="local", openai_client=client), model_settings=settings)
    # Turn 1 must use the tool (the 135M model, left to choose after a tool result, calls it again
    # and again); turn 2 answers in the output_type. Both requests carry tools and response_format.
    first = agents.Runner.run_sync(agent.clone(model_settings=settings.resolve(agents.ModelSettings(tool_choice="required")),
                                               tool_use_behavior="stop_on_first_tool"),
                                   "What is the weather in Paris?", max_turns=2)
    assert calls and first.final_output == "Sunny, 24 C"
    second = agents.Runner.run_sync(agent.clone(model_settings=settings.resolve(agents.ModelSettings(tool_choice="none"))),
                                    first.to_input_list() + [{"role": "user", "content": "Now the report, please."}],
                                    max_turns=2)
    assert isinstance(second.final_output, Report)
    assert statuses and set(statuses) == {200}, statuses
    cached = second.raw_responses[0].usage.input_tokens_details.cached_tokens
    assert cached > 0


def recording_openai_client(base_url: str, agent: str, log: list):
    """An openai SDK client whose every request body and answer (status, usage) lands in `log`."""
    import httpx2  # the openai SDK's HTTP client
    from openai import AsyncOpenAI

    async def request(req):
        log.append({"body": json.loads(req.content)})

    async def response(resp):
        await resp.aread()
        log[-1] |= {"status": resp.status_code, "usage": resp.json().get("usage")}

    return AsyncOpenAI(base_url=base_url + "/v1", api_key="local", max_retries=0,
                       default_headers={"X-Agent-ID": agent},
                       http_client=httpx2.AsyncClient(event_hooks={"request": [request], "response": [response]}))


def test_pydantic_ai_with_a_strict_tool_and_tool_choice_required(base_url):
    """pydantic-ai with a strict function tool and a structured output: every request carries
    `tool_choice: "required"` and `strict: true` tools (its output is a `final_result` tool call),
    each answer is a tool call the SDK validates into the output type, and turn 2 (the history
    plus a new question) reads turn 1 back from cache."""
    from pydantic import BaseModel
    from pydantic_ai import Agent, Tool
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    class Report(BaseModel):
        city: str
        summary: str

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "Sunny, 24 C"

    log: list[dict] = []
    model = OpenAIChatModel("local", provider=OpenAIProvider(
        openai_client=recording_openai_client(base_url, "pydantic-ai-weather", log)))
    agent = Agent(model, output_type=Report, tools=[Tool(get_weather, strict=True)], retries=2,
                  model_settings={"temperature": 0, "max_tokens": 256})

    async def two_turns():
        first = await agent.run("What is the weather in Paris?")
        turn_one = len(log)
        second = await agent.run("Now the report for Rome, please.", message_history=first.all_messages())
        return first, second, turn_one

    first, second, turn_one = asyncio.run(two_turns())
    assert isinstance(first.output, Report) and isinstance(second.output, Report)
    assert [r["status"] for r in log] == [200] * len(log)
    for r in log:
        assert r["body"]["tool_choice"] == "required"
        assert all(t["function"]["strict"] is True for t in r["body"]["tools"])
        assert {t["function"]["name"] for t in r["body"]["tools"]} == {"get_weather", "final_result"}
    previous = log[turn_one - 1]["usage"]
    cached = log[turn_one]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= previous["prompt_tokens"], (previous, log[turn_one]["usage"])


@pytest.mark.slow
def test_claude_agent_sdk_with_an_in_process_tool(base_url, tmp_path):
    """The Claude Agent SDK (which runs its own bundled Claude Code CLI) with one in-process MCP
    tool and a short system prompt, two turns of one ClaudeSDKClient session: every request is a
    200 and declares the tool, and turn 2's first request reads from cache at least 98 % of what
    turn 1's last request had as prompt and reply. The 135M model rambles rather than call the
    tool, and Claude Code retries replies cut at CLAUDE_CODE_MAX_OUTPUT_TOKENS, so a turn may
    end with the client's own max-output error; any other error is a failure."""
    from claude_agent_sdk import (ClaudeAgentOptions, ClaudeSDKClient, ResultMessage, create_sdk_mcp_server,
                                  tool)

    from perf.agents_cc import brief, reuse
    from perf.agents_cc.claude import environment
    from perf.agents_cc.recorder import Recorder

    @tool("get_weather", "Get the current weather in a city.", {"city": str})
    async def get_weather(args):
        return {"content": [{"type": "text", "text": "Sunny, 24 C"}]}

    async def session(rec: Recorder) -> list:
        options = ClaudeAgentOptions(
            model="local", system_prompt="You are a weather assistant. Use the get_weather tool.", tools=[],
            mcp_servers={"weather": create_sdk_mcp_server("weather", tools=[get_weather])},
            allowed_tools=["mcp__weather__get_weather"], max_turns=3, cwd=str(tmp_path),
            env=environment(rec.base, tmp_path / "home", max_output=64))
        results = []
        async with ClaudeSDKClient(options=options) as client:
            for i, prompt in enumerate(["What is the weather in Paris?", "And in Rome?"]):
                rec.label = f"turn {i + 1}"
                await client.query(prompt)
                results += [m async for m in client.receive_response() if isinstance(m, ResultMessage)]
        return results

    (tmp_path / "home").mkdir()
    with Recorder(base_url) as rec:
        results = asyncio.run(session(rec))
    assert len(results) == 2
    for result in results:
        assert not result.is_error or "output token maximum" in (result.result or ""), result
    turns = [[r for r in rec.records if r["label"] == f"turn {i}"] for i in (1, 2)]
    assert turns[0] and turns[1]
    for r in turns[0] + turns[1]:
        assert r["status"] == 200, r
        assert "mcp__weather__get_weather" in [t["name"] for t in r["body"]["tools"]]
    share = reuse(brief(turns[0][-1]), brief(turns[1][0]))
    assert share["fraction"] >= 0.98, share
