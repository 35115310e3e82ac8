"""Prompt-lookup (n-gram) drafting: each sequence guesses its next tokens by finding its last few
tokens earlier in its own prompt and output, and proposing what followed them there.

Pure Python, no MLX: one `Drafter` per sequence keeps an index of every n-gram (n = 1..max_ngram)
of its history to the position right after its most recent earlier occurrence, updated as tokens
arrive, so a draft costs a few dict lookups. It tracks how often the model accepts its drafts, per
token: the verify step (verify.py) sizes each step's drafts by it, and a sequence whose drafts are
rarely accepted stops drafting (a verify step that keeps nothing costs more than a plain one).
"""

from __future__ import annotations

# After this many drafted tokens, a sequence whose acceptance is below MIN_ACCEPTANCE stops drafting.
PROBATION = 24
MIN_ACCEPTANCE = 0.3
# Before any verdict a draft token is taken to be accepted at PRIOR[0] / PRIOR[1] (2 of 3).
PRIOR = (2.0, 3.0)


class Drafter:
    """One sequence's n-gram index over its history (prompt, then every token it keeps)."""

    def __init__(self, history: list[int], max_draft: int, max_ngram: int = 3, min_ngram: int = 2):
        self.max_draft = max_draft
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.drafted = 0
        self.accepted = 0
        self.rejections = 0  # verify steps that rejected one of its draft tokens
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
        """Up to min(limit, max_draft) tokens that followed the longest match of the history's
        last tokens; [] when nothing matches or drafting is off."""
        k = min(limit, self.max_draft)
        if not self.enabled or k <= 0:
            return []
        hist = self.tokens
        for n in range(min(self.max_ngram, len(hist)), self.min_ngram - 1, -1):
            start = self.index.get(tuple(hist[len(hist) - n :]))
            if start is not None:
                return hist[start : start + k]
        return []

    def verified(self, drafted: int, accepted: int) -> None:
        """A verify step kept `accepted` of `drafted` tokens; too few accepted: stop drafting."""
        self.drafted += drafted
        self.accepted += accepted
        self.rejections += accepted < drafted
        if self.drafted >= PROBATION and self.accepted < MIN_ACCEPTANCE * self.drafted:
            self.enabled = False

    def acceptance(self) -> float:
        """The chance its next draft token is accepted: each verdict so far, a token accepted or a
        step's first rejection, counted once (the estimate for a geometric run), with a prior."""
        return (self.accepted + PRIOR[0]) / (self.accepted + self.rejections + PRIOR[1])
