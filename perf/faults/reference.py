"""The crash test's agents, their conversations, and the answers a daemon without a cache gives."""

from __future__ import annotations

from perf.faults.daemon import Daemon, cached_of, text_of

TOPICS = ["astronomy", "cooking", "sailing", "chess", "gardening", "music"]
AGENTS = [f"crash-agent.{i}" for i in range(len(TOPICS))]
FOLLOW_UP = "And one more, please."
RULES = 6  # sentences of each system prompt


def system_prompt(i: int) -> str:
    """A distinct ~180-token system prompt per agent (its KV file is ~8 MB in float32)."""
    topic = TOPICS[i]
    return " ".join(f"Rule {k}: as the {topic} assistant number {i}, you always answer questions about "
                    f"{topic} briefly, politely and with one concrete example." for k in range(RULES))


def conversation(i: int, replies: list[str]) -> list[dict]:
    """Agent i's next turn after the given assistant replies (turn 1 when there are none)."""
    messages = [{"role": "system", "content": system_prompt(i)},
                {"role": "user", "content": f"Give me one tip about {TOPICS[i]}."}]
    for reply in replies:
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": FOLLOW_UP}]
    return messages


class ColdReference:
    """Greedy answers of a daemon without a cache, turn by turn; each turn is built on the previous
    cold answers (a warm daemon must give the same ones, so its conversations are the same)."""

    def __init__(self, daemon: Daemon, agents: list[str]):
        self.daemon = daemon
        self.replies: dict[str, list[str]] = {a: [] for a in agents}

    def messages(self, agent: str, turn: int) -> list[dict]:
        """Agent's turn (1-based), computing the cold answers it builds on if needed."""
        self.ensure(turn - 1)
        return conversation(AGENTS.index(agent), self.replies[agent][: turn - 1])

    def answer(self, agent: str, turn: int) -> str:
        self.ensure(turn)
        return self.replies[agent][turn - 1]

    def ensure(self, turns: int) -> None:
        while len(next(iter(self.replies.values()))) < turns:
            done = len(next(iter(self.replies.values())))
            answers = self.daemon.chat_all({a: conversation(AGENTS.index(a), r) for a, r in self.replies.items()})
            for agent, r in answers.items():
                assert cached_of(r) == 0, f"the cold daemon used a cache: {r['usage']}"
                self.replies[agent].append(text_of(r))
            assert all(len(v) == done + 1 for v in self.replies.values())


def first_difference(got: str, want: str) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"first differing character at index {i}: warm {got!r} vs cold {want!r}"
