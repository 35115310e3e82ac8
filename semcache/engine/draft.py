"""Prompt-lookup (n-gram) drafting: each sequence guesses its next tokens by finding its last few
tokens earlier in its own prompt and output, and proposing what followed them there.

Pure Python, no MLX: one `Drafter` per sequence keeps an index of every n-gram (n = 1..max_ngram)
of its history to the position right after its most recent earlier occurrence, updated as tokens
arrive, so a draft costs a few dict lookups. The draft length adapts to what the model accepts, and
a sequence whose drafts are rarely accepted stops drafting (a verify step that keeps nothing costs
more than a plain decode step).
"""

from __future__ import annotations

# After this many drafted tokens, a sequence whose acceptance is below MIN_ACCEPTANCE stops drafting.
PROBATION = 24
MIN_ACCEPTANCE = 0.3


class Drafter:
    """One sequence's n-gram index over its history (prompt, then every token it keeps)."""

    def __init__(self, history: list[int], max_draft: int, max_ngram: int = 3, min_ngram: int = 2):
        self.max_draft = max_draft
        self.length = max_draft  # the current draft length, adapted to acceptance
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.drafted = 0
        self.accepted = 0
        self.enabled = max_draft > 0
        self.extend(history)

    def extend(self, tokens: list[int]) -> None:
        """Append kept tokens; index each n-gram that now has a continuation."""
        hist = self.tokens
        for t in tokens:
            end = len(hist)  # the n-grams ending at end-1 are followed by t
            for n in range(1, self.max_ngram + 1):
                if end - n < 0:
                    break
                self.index[tuple(hist[end - n : end])] = end
            hist.append(t)

    def draft(self, limit: int) -> list[int]:
        """Up to min(limit, current length) tokens that followed the longest match of the
        history's last tokens; [] when nothing matches or drafting is off."""
        k = min(limit, self.length)
        if not self.enabled or k <= 0:
            return []
        hist = self.tokens
        for n in range(min(self.max_ngram, len(hist)), self.min_ngram - 1, -1):
            start = self.index.get(tuple(hist[len(hist) - n :]))
            if start is not None:
                return hist[start : start + k]
        return []

    def verified(self, drafted: int, accepted: int) -> None:
        """A verify step kept `accepted` of `drafted` tokens: adapt the length, maybe stop."""
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.length = min(self.max_draft, self.length + 1)
        else:
            self.length = max(1, accepted + 1)
        if self.drafted >= PROBATION and self.accepted < MIN_ACCEPTANCE * self.drafted:
            self.enabled = False
