"""Claude Code, the real client, on the embedded model (slow): `perf.agents_cc` runs it against a
live daemon through a recording proxy, and these tests read its report (one implementation)."""

from __future__ import annotations

import re

import pytest

from perf import agents_cc
from perf.agents_cc import claude

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture(scope="module")
def report():
    try:
        claude.binary()
    except FileNotFoundError as exc:  # a missing client fails, with the command that installs it
        pytest.fail(str(exc))
    return agents_cc.run(None, turns=3, max_output=48)


def test_default_mode_gets_the_overflow_error_it_understands(report):
    """Its ~12K-token default request cannot fit 8K: every request gets Anthropic's exact overflow
    message (never a 400 about a system role), and Claude Code prints its own explanation."""
    default = report["default_mode"]
    assert default["requests"], "Claude Code sent nothing"
    for r in default["requests"]:
        assert r["status"] == 400 and re.fullmatch(r"prompt is too long: \d+ tokens > 8191 maximum", r["error"]), r
    assert default["returncode"] != 0 and "Prompt is too long" in default["printed"]


def test_a_bare_session_answers_every_request(report):
    """A 3-turn --bare --tools Read session (--session-id, then --resume), a `/compact` turn and a
    turn after it: every request is a 200.
    A turn may still end with the client's own error when the 135M model rambles past
    CLAUDE_CODE_MAX_OUTPUT_TOKENS (Claude Code retries a max_tokens stop, then gives up); any
    other failure of the client is a failure here."""
    for session in report["sessions"]:
        for turn in session["turns"]:
            assert turn["requests"] and all(r["status"] == 200 for r in turn["requests"]), turn["requests"]
            assert turn["returncode"] == 0 or "output token maximum" in turn["answer"], turn


def test_each_turn_reads_back_what_the_previous_turn_sent(report):
    """The first request of turns 2 and 3 (and of the `/compact` turn) reads from cache at least
    98 % of the tokens the previous turn's last request had as prompt and reply."""
    turns = [t for t in report["sessions"][0]["turns"][1:] if t["kind"] != "after compaction"]
    assert [t["kind"] for t in turns] == ["turn 2", "turn 3", "compaction"]
    for turn in turns:
        assert turn["reuse"]["fraction"] >= 0.98, turn


def test_after_a_compaction_the_shared_prefix_is_still_read(report):
    """The turn after `/compact` sends a summary in place of the history: it still reads at least
    90 % of the system and tool prefix it shares with the session's first request."""
    after = report["sessions"][0]["turns"][-1]
    assert after["kind"] == "after compaction" and all(r["status"] == 200 for r in after["requests"])
    assert after["reuse"]["shared_tokens"] > 100 and after["reuse"]["fraction"] >= 0.9, after["reuse"]


def test_a_second_session_reads_the_shared_system_and_tool_prefix(report):
    """A new session (its billing line differs) reads at least 90 % of the system and tool prefix
    it shares with the first session."""
    shared = report["shared_prefix"]
    assert shared["shared_tokens"] > 100 and shared["fraction"] >= 0.9, shared
