"""The official anthropic and openai SDKs against a live server (fake engine) on 127.0.0.1."""

import anthropic
import openai
import pytest

from semcache.http.app import make_app
from semcache.ops.config import Config
from tests.conftest import FAKE_REPLY, FakeEngine, serve_in_thread

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def base_url(tokenizer, tmp_path_factory):
    config = Config(cache_dir=str(tmp_path_factory.mktemp("cache")))
    with serve_in_thread(make_app(config, engine=FakeEngine(tokenizer))) as url:
        yield url


class TestAnthropicSDK:
    def test_create(self, claude):
        """messages.create parses the response into a Message."""
        msg = claude.messages.create(model="claude-x", max_tokens=64, messages=USER,
                                     extra_body={"temperature": 0})
        assert msg.content[0].text == FAKE_REPLY
        assert msg.stop_reason == "end_turn" and msg.model == "claude-x"
        assert msg.usage.output_tokens == 11

    def test_stream_helper_final_message(self, claude):
        """messages.stream() yields the text and assembles the final message with usage."""
        with claude.messages.stream(model="m", max_tokens=64, messages=USER) as stream:
            pieces = list(stream.text_stream)
            final = stream.get_final_message()
        assert "".join(pieces) == FAKE_REPLY
        assert final.content[0].text == FAKE_REPLY and final.usage.output_tokens == 11

    def test_stop_sequence(self, claude):
        """stop_sequences are honoured and reported."""
        msg = claude.messages.create(model="m", max_tokens=64, messages=USER, stop_sequences=["jumps"])
        assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "jumps"
        assert msg.content[0].text == "The quick brown fox "

    def test_count_tokens(self, claude):
        """count_tokens matches the usage of the same prompt."""
        counted = claude.messages.count_tokens(model="m", messages=USER, system="be nice")
        msg = claude.messages.create(model="m", max_tokens=1, messages=USER, system="be nice")
        assert counted.input_tokens == msg.usage.input_tokens

    def test_models(self, claude):
        """models.list and models.retrieve parse in the Anthropic shape; any id the generation
        routes accept is found, with the real context window."""
        assert [m.id for m in claude.models.list()] == ["fake-model"]
        assert claude.models.retrieve("fake-model").id == "fake-model"
        local = claude.models.retrieve("local")
        assert local.id == "local" and local.max_input_tokens == 8192

    def test_bad_request(self, claude):
        """A malformed body raises BadRequestError, also for stream=True."""
        with pytest.raises(anthropic.BadRequestError):
            claude.messages.create(model="m", max_tokens=5, messages=["hi"], stream=True)

    def test_old_sdk_style_headers(self, base_url):
        """x-api-key with anthropic-version 2023-06-01 (the 0.x SDK style) is accepted."""
        client = anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0,
                                     default_headers={"anthropic-version": "2023-06-01", "x-api-key": "k"})
        assert client.messages.create(model="m", max_tokens=3, messages=USER).usage.output_tokens == 3


class TestOpenAISDK:
    def test_create(self, oai):
        """chat.completions.create parses; max_tokens gives finish_reason length."""
        r = oai.chat.completions.create(model="gpt-x", messages=USER, max_tokens=3, temperature=0, seed=1)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
        assert r.model == "gpt-x"

    def test_stream_helper(self, oai):
        """The stream() helper accumulates content with role 'assistant' (sent once)."""
        with oai.chat.completions.stream(model="m", messages=USER,
                                         stream_options={"include_usage": True}) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        assert final.choices[0].message.content == FAKE_REPLY
        assert final.choices[0].message.role == "assistant"
        assert final.usage.completion_tokens == 11

    def test_raw_stream_equals_non_stream(self, oai):
        """Streamed deltas concatenate to the non-streamed text."""
        chunks = oai.chat.completions.create(model="m", messages=USER, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        full = oai.chat.completions.create(model="m", messages=USER).choices[0].message.content
        assert text == full == FAKE_REPLY

    def test_n_choices(self, oai):
        """n=2 returns two choices the SDK parses, with their indexes."""
        r = oai.chat.completions.create(model="m", messages=USER, n=2)
        assert [c.index for c in r.choices] == [0, 1]
        assert all(c.message.content == FAKE_REPLY for c in r.choices)

    def test_models(self, oai):
        """models.list parses in the OpenAI shape."""
        assert [m.id for m in oai.models.list()] == ["fake-model"]

    def test_errors(self, oai):
        """Malformed and unsupported requests raise BadRequestError with our message."""
        with pytest.raises(openai.BadRequestError, match="stream_options"):
            oai.chat.completions.create(model="m", messages=USER, stream_options={"include_usage": True})
        with pytest.raises(openai.BadRequestError, match="tools"):
            oai.chat.completions.create(model="m", messages=USER, tools=[
                {"type": "function", "function": {"name": "bad name!", "parameters": {"type": "object"}}}])

    def test_agent_turn_two_reports_cached_tokens(self, oai):
        """With X-Agent-ID, turn 2's usage.prompt_tokens_details.cached_tokens covers turn 1."""
        system = {"role": "system", "content": "You answer briefly and precisely. " * 12}
        messages = [system, {"role": "user", "content": "First?"}]
        agent = {"X-Agent-ID": "sdk-agent"}
        first = oai.chat.completions.create(model="m", messages=messages, extra_headers=agent)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "Second?"}]
        second = oai.chat.completions.create(model="m", messages=messages, extra_headers=agent)
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError, match="X-Agent-ID"):
            oai.chat.completions.create(model="m", messages=messages, extra_headers={"X-Agent-ID": "bad id"})
