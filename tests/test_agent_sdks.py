"""Agent SDKs end to end on the embedded model, against a live daemon on 127.0.0.1: each run is two
turns of one agent with a declared tool; every call must be a 200 and turn 2 must read cached tokens."""

from __future__ import annotations

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
