"""KV for running sequences, reserved a step of tokens at a time rather than for all they may write.

A request may ask for 32,000 tokens and write 50: reserving its whole allowance at admission would
turn a 32K-context model's every request into a refusal under the default budget. Each sequence holds
KV for what it has plus `kv_grow_tokens` more; when one needs more and the budget is spent, the
newest decoding sequence is preempted: its KV goes to the agent cache, it waits again at the head of
its priority, and it resumes from that KV without prefilling anew.
"""

from __future__ import annotations

from typing import Callable

from semcache.engine.types import ModelInfo
from semcache.scheduler.limits import Limits, TooLarge
from semcache.scheduler.running import Running
from semcache.scheduler.sequence import Sequence


class KVBudget:
    def __init__(self, limits: Limits, running: Running, info: Callable[[], ModelInfo | None]):
        self.limits = limits
        self.running = running
        self.info = info

    def tokens_for(self, seq: Sequence) -> int:
        """Tokens to hold for `seq` now: all it has, plus a step ahead within what it may write."""
        ahead = min(seq.num_output_tokens + self.limits.kv_grow_tokens, seq.max_output)
        return seq.num_prompt_tokens + max(ahead, seq.num_output_tokens)

    def bytes(self, tokens: int) -> int:
        info = self.info()
        return tokens * (info.kv_bytes_per_token if info else 0)

    def check(self, seq: Sequence) -> None:
        """TooLarge when `seq` could not start even alone, so it fails now, not at its deadline."""
        need = self.bytes(self.tokens_for(seq))
        if need > self.limits.kv_budget:
            raise TooLarge(
                f"prompt ({seq.num_prompt_tokens} tokens) plus the first {self.tokens_for(seq) - seq.num_prompt_tokens} "
                f"output tokens need {need} bytes of KV cache, more than kv_budget ({self.limits.kv_budget} bytes)"
            )

    def fits(self, seq: Sequence) -> bool:
        return self.running.kv_reserved + self.bytes(self.tokens_for(seq)) <= self.limits.kv_budget

    def grow(self) -> tuple[list[Sequence], list[Sequence]]:
        """Reserve the next step for every running sequence about to outgrow its KV, oldest first.
        Returns (sequences to preempt, sequences that cannot grow even alone: the budget is their
        context). The caller preempts the first and ends the second."""
        preempt, stuck = [], []
        running = self.running
        # Runs every step: only sequences whose next token would pass their reservation do work.
        needy = [s for s in running.seqs.values() if s.num_prompt_tokens + s.num_output_tokens + 1 > s.kv_tokens]
        for seq in sorted(needy, key=_age):
            if seq in preempt:
                continue
            tokens = self.tokens_for(seq)
            extra = self.bytes(tokens - seq.kv_tokens)
            while running.kv_reserved - self._freed(preempt) + extra > self.limits.kv_budget:
                victims = [s for s in running.seqs.values() if s.num_output_tokens and s not in preempt]
                victim = max(victims, key=_age)
                if victim is seq and len(victims) == 1:  # it alone outgrows the budget
                    stuck.append(seq)
                    break
                preempt.append(victim)
                if victim is seq:
                    break
            else:
                running.grow(seq, tokens, extra)
        return preempt, stuck

    def _freed(self, seqs: list[Sequence]) -> int:
        return sum(self.bytes(s.kv_tokens) for s in seqs)

    def check_integrity(self) -> None:
        running = self.running.seqs.values()
        assert self.running.kv_reserved == sum(self.bytes(s.kv_tokens) for s in running), "KV drifted"
        assert self.running.kv_reserved <= self.limits.kv_budget


def _age(seq: Sequence) -> tuple[float, int]:
    """Oldest first: first admission, then arrival order (a resumed sequence keeps its age)."""
    return (seq.admitted_at or 0.0, seq.seq_id)
