"""Reasoning models: a template with <think> tags (written for these tests, Qwen3-style) on the fake
engine. The thinking comes back apart from the answer: Anthropic `thinking` blocks with a
deterministic signature (streamed as thinking_delta then signature_delta), OpenAI
`reasoning_content`; and a template that drops earlier thinking still lets the next turn read back
everything it sent."""

from __future__ import annotations

import json

import pytest

from semcache.http.appkeys import SERVICE
from semcache.text.reasoning import ThinkSplitter, Thinking
from tests.conftest import FakeEngine, settled

ANTHROPIC = {"anthropic-version": "2023-06-01"}
SYSTEM = "You are a careful assistant. " * 12  # past cache_min_prefix
# History keeps only what follows </think>, as Qwen3's template does; the generation prompt either
# opens the thinking itself (OPENED) or leaves the model to write <think> (EMITTED).
TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' %}{{ m.content.split('</think>')[-1].lstrip('\n') }}"
    "{%- else %}{{ m.content }}{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{{ opening }}{%- endif %}"
)
THOUGHT, ANSWER = "Two plus two makes four.", "It is 4."


class ReasoningTokenizer:
    """The embedded model's tokenizer with a reasoning chat template."""

    def __init__(self, tokenizer, opened: bool):
        self._tokenizer = tokenizer
        self.chat_template = TEMPLATE.replace("{{ opening }}", "<think>\n" if opened else "{# <think> #}")

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, conversation, **kwargs):
        return self._tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)


@pytest.fixture(params=[True, False], ids=["opened-by-prompt", "emitted-by-model"])
async def client(request, make_client, tokenizer):
    opened = request.param
    reply = f"{THOUGHT}\n</think>\n\n{ANSWER}" if opened else f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"
    engine = FakeEngine(ReasoningTokenizer(tokenizer, opened), reply=reply)
    return await make_client(engine=engine)


def body(*turns: str, **extra) -> dict:
    roles = ["user", "assistant"]
    return {"model": "m", "max_tokens": 128, "system": SYSTEM,
            "messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)], **extra}


async def test_anthropic_answer_has_a_signed_thinking_block(client):
    r = await client.post("/v1/messages", json=body("2+2?", thinking={"type": "adaptive"}), headers=ANTHROPIC)
    data = await r.json()
    thinking, text = data["content"]
    assert thinking["type"] == "thinking" and thinking["thinking"] == THOUGHT and thinking["signature"]
    assert text == {"type": "text", "text": ANSWER}
    again = await (await client.post("/v1/messages", json=body("2+2?"), headers=ANTHROPIC)).json()
    assert again["content"][0]["signature"] == thinking["signature"]  # deterministic


async def test_anthropic_stream_sends_thinking_then_signature_then_text(client):
    r = await client.post("/v1/messages", json=body("2+2?", stream=True), headers=ANTHROPIC)
    events = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: ")]
    kinds = [e["type"] if "delta" not in e or not isinstance(e["delta"], dict) or "type" not in e["delta"]
             else e["delta"]["type"] for e in events]
    kinds = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]  # runs of deltas as one
    assert kinds == ["message_start", "ping", "content_block_start", "thinking_delta", "signature_delta",
                     "content_block_stop", "content_block_start", "text_delta", "content_block_stop",
                     "message_delta", "message_stop"], kinds
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text"]
    thought = "".join(e["delta"]["thinking"] for e in events if e.get("delta", {}).get("type") == "thinking_delta")
    answer = "".join(e["delta"]["text"] for e in events if e.get("delta", {}).get("type") == "text_delta")
    assert (thought, answer) == (THOUGHT, ANSWER)


async def test_openai_gets_reasoning_content(client):
    chat = {"model": "m", "messages": [{"role": "user", "content": "2+2?"}]}
    data = await (await client.post("/v1/chat/completions", json=chat)).json()
    message = data["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (THOUGHT, ANSWER)
    r = await client.post("/v1/chat/completions", json={**chat, "stream": True})
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in (await r.text()).splitlines()
              if line.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THOUGHT
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER


async def test_dropped_thinking_still_lets_the_next_turn_read_back_all_it_sent(client, tokenizer):
    """The template drops the thinking from history, so every reply diverges at its first token:
    its canonical form is prefilled in the background, and turn 2 computes only its new message."""
    service = client.app[SERVICE]
    headers = {**ANTHROPIC, "X-Agent-ID": "thinker"}
    first = await (await client.post("/v1/messages", json=body("2+2?"), headers=headers)).json()
    await settled(service)
    history = [{"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": [first["content"][1]]}, {"role": "user", "content": "And 3+3?"}]
    second = await (await client.post("/v1/messages", json={**body(), "messages": history}, headers=headers)).json()
    usage = second["usage"]
    new_turn = len(tokenizer.encode("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n",
                                    add_special_tokens=False))
    assert service.turns.num_canonical == 1
    assert usage["input_tokens"] + usage["cache_creation_input_tokens"] <= new_turn
    divergence = service.scheduler.metrics.reply_divergence  # where: at the reply's very first token
    assert divergence._sum.get() == 0 and sum(b.get() for b in divergence._buckets) == 1


def test_the_splitter_holds_back_a_partial_tag():
    splitter = ThinkSplitter()
    pieces = [p for chunk in ["<thi", "nk>\nA</th", "ink>", "\n\nB"] for p in splitter.feed(chunk)] + splitter.flush()
    assert pieces == [Thinking("A"), "B"]
