"""The sizes of a baseline run: the full one and the quick one."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Params:
    quick: bool
    max_tokens: int  # output tokens per request of the concurrency workloads
    concurrency: tuple[int, ...]
    rounds: int  # rounds of the concurrency workloads; targets alternate within each round
    turns: int  # turns of the one-agent conversation
    system_sentences: int  # its system prompt (perf.common.system_prompt): 37 sentences ≈ 1,000 tokens
    agent_max_tokens: int  # output tokens per turn, one agent and multi-agent alike
    health_probes: int  # sequential probes on the idle daemon
    health_bursts: int  # bursts of `burst_size` probes in flight at once
    burst_size: int
    health_timeout_s: float  # a probe unanswered this long counts as a timeout
    agents: int  # multi-agent part: agents taking 3 turns, restart, 1 more turn
    agent_budget: str  # its cache_memory_budget (must not hold every agent)


FULL = Params(quick=False, max_tokens=64, concurrency=(1, 4, 16), rounds=3, turns=8, system_sentences=37,
              agent_max_tokens=32, health_probes=200, health_bursts=5, burst_size=100, health_timeout_s=30.0,
              agents=12, agent_budget="256MiB")
# Quick: ~1,000-token prompts still (their prefill is what the cache saves), fewer of everything else;
# a 64 MiB budget holds one agent's entry, so the second one's turns come from disk.
QUICK = dataclasses.replace(FULL, quick=True, max_tokens=16, rounds=1, turns=4, agent_max_tokens=16,
                            health_probes=100, health_bursts=3, agents=2, agent_budget="64MiB")
