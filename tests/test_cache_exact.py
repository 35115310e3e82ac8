"""Warm equals cold on the embedded model (float32 on CPU), through the anthropic SDK on a live server.

With greedy decoding, an answer computed from cached KV (in memory, spilled to disk, after a
restart) must be token-for-token the answer computed from scratch. The cold reference runs under
another API key (tenant), which never sees the warm tenant's entries.
"""

from __future__ import annotations

import anthropic
import pytest

from semcache.http.app import make_app
from semcache.ops.config import Config
from tests.conftest import serve_in_thread

pytestmark = pytest.mark.model

SYSTEM = ("You are a patient geography tutor. Answer in one or two short sentences. "
          + " ".join(f"Fact {i}: every capital city has a history worth a short story." for i in range(12)))
TURNS = ["What is the capital of France?", "And the capital of Italy?", "Which of the two is further south?",
         "Name one river in the first city."]
KEYS = ["warm"] + [f"cold-{i}" for i in range(8)]


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assert_same(warm: str, cold: str, where: str) -> None:
    if warm != cold:
        i = first_difference(warm, cold)
        pytest.fail(f"{where}: warm and cold answers differ at character {i}: "
                    f"warm {warm[i:i + 40]!r} vs cold {cold[i:i + 40]!r}")


class Conversation:
    def __init__(self, url: str):
        self.url = url
        self.messages: list[dict] = []

    def client(self, key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0)

    def ask(self, key: str, agent: str | None = "tutor", max_tokens: int = 24):
        headers = {"X-Agent-ID": agent} if agent else {}
        return self.client(key).messages.create(
            model="semcache", max_tokens=max_tokens, system=SYSTEM, messages=self.messages,
            extra_body={"temperature": 0}, extra_headers=headers)

    def turn(self, question: str, cold_key: str, where: str) -> anthropic.types.Message:
        """Ask warm and cold; check they agree; extend the conversation with the answer."""
        self.messages.append({"role": "user", "content": question})
        warm = self.ask("warm")
        cold = self.ask(cold_key, agent="tutor")
        assert cold.usage.cache_read_input_tokens == 0, "the cold tenant must not see warm entries"
        assert_same(warm.content[0].text, cold.content[0].text, where)
        self.messages.append({"role": "assistant", "content": warm.content[0].text})
        return warm


def config(cache_dir) -> Config:
    return Config(cache_dir=str(cache_dir), api_keys=KEYS, cache_min_prefix=16)


def test_warm_equals_cold_in_memory_on_disk_and_after_restart(tmp_path):
    """Greedy answers from cached KV match answers from scratch: memory hit, disk hit, after a restart."""
    convo = None
    with serve_in_thread(make_app(config(tmp_path))) as url:
        convo = Conversation(url)
        first = convo.turn(TURNS[0], "cold-0", "turn 1")
        assert "Paris" in first.content[0].text
        second = convo.turn(TURNS[1], "cold-1", "turn 2 (memory hit)")
        read = second.usage.cache_read_input_tokens
        count = convo.client("warm").messages.count_tokens(model="semcache", system=SYSTEM,
                                                           messages=convo.messages[:-1]).input_tokens
        assert read > count // 2
        assert read + second.usage.input_tokens + second.usage.cache_creation_input_tokens == count
        evicted = convo.client("warm").post("/v1/agents/tutor/evict", cast_to=object, body={})
        assert {e["tier"] for e in evicted["entries"]} == {"disk"}
        third = convo.turn(TURNS[2], "cold-2", "turn 3 (disk hit)")
        assert third.usage.cache_read_input_tokens > read
    with serve_in_thread(make_app(config(tmp_path))) as url:  # a new daemon on the same folder
        convo.url = url
        fourth = convo.turn(TURNS[3], "cold-3", "turn 4 (after restart)")
        assert fourth.usage.cache_read_input_tokens > third.usage.cache_read_input_tokens
