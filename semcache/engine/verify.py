"""The decode step of the running batch, with prompt-lookup speculation (on the MLX thread only).

Without drafts, a step feeds each row its latest token and samples one more. When some rows have a
draft (draft.py), the step feeds every row its latest token and its draft, right-padded to one
width, in one forward pass with logits at every position, and keeps for each row the longest
verified run plus one token sampled from the model:

- greedy rows keep draft tokens while each equals the argmax at its position, then the argmax;
- sampled rows use the speculative sampling rule for a deterministic draft: draft token d at a
  position is kept with probability p(d) under the row's own distribution there (temperature,
  top-k, top-p); on rejection the token comes from p with d removed, renormalised; when the whole
  draft is kept, one more from the next position. It is computed by sampling each position as a
  plain step would and keeping the draft while they agree, so a seed's tokens do not depend on
  speculation at all;
- rows without a draft (grammar-constrained rows never draft) sample position 0 as a plain step.

The width is chosen each step for the most step cost saved (best_width): a row with a draft of k
tokens, accepted at a rate a per token, is expected to keep 1 + a + ... + a^k tokens; a step
feeding T tokens costs fixed + T (stepcost.py, learnt from the steps themselves). A wide batch on a
CPU pays for every fed token, so it drafts short or not at all; one row drafts long. The positions
a row did not keep are dropped from its KV without a copy (raggedkv.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from semcache.engine.draft import Drafter
from semcache.engine.raggedkv import trim_rows
from semcache.engine.sampling import sample_batch, sample_row
from semcache.engine.stepcost import StepCost
from semcache.engine.types import SamplingParams

# A row is one the batch waits for when it has at least this share of the most steps left of any row.
CRITICAL = 0.8
# A token kept early by a row the batch does not wait for is worth this share of one kept by a row it
# waits for (see best_width).
MINOR_WORTH = 0.5

@dataclass(eq=False)
class Row:
    """A sequence's sampling state (its PRNG key advances once per random draw) and its drafter."""

    seq_id: int
    sampling: SamplingParams
    key: Any = None
    left: int | None = None  # tokens it may still generate (None: no limit known here)
    drafter: Drafter | None = None
    steps: int = 0  # decode steps it has taken, and tokens they kept
    made: int = 0

    def start(self, history: list[int], first: int, max_draft: int) -> None:
        """It has sampled its first token after `history`: draft from here on (unconstrained rows)."""
        self.left = None if self.left is None else self.left - 1
        if max_draft > 0 and self.sampling.constraint is None:
            self.drafter = Drafter(history + [first], max_draft)

    def draft(self) -> list[int]:
        """Its draft, at most as long as it may still generate beyond this step's token."""
        if self.drafter is None:
            return []
        return self.drafter.draft(self.drafter.max_draft if self.left is None else self.left - 1)

    def acceptance(self) -> float:
        return self.drafter.acceptance() if self.drafter is not None else 0.0

    def steps_left(self) -> float:
        """Steps it is expected to take still, at the tokens per step it has kept so far."""
        return float("inf") if self.left is None else self.left * (self.steps + 1) / (self.made + 1)

    def kept(self, tokens: list[int], drafted: int) -> None:
        self.steps += 1
        self.made += len(tokens)
        if self.left is not None:
            self.left -= len(tokens)
        if self.drafter is not None:
            if drafted:
                self.drafter.verified(drafted, len(tokens) - 1)
            self.drafter.extend(tokens)


class Verified(dict):
    """seq_id -> the tokens a row kept this step, in order; `drafted` and `accepted` per row that drafted."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[int, tuple[int, int]] = {}


def decode(forward: Any, cache: list[Any], inputs: Any, rows: list[Row], sample=sample_batch,
           cost: StepCost | None = None) -> tuple[Verified, Any]:
    """One step for every row: (tokens each kept, the new inputs [B] not yet fed)."""
    out = Verified()
    drafts = [row.draft() for row in rows]
    longest = 0
    if any(drafts):
        longest = best_width(drafts, [row.acceptance() for row in rows], cost.fixed(len(rows)) if cost else 0.0,
                             critical(rows)) - 1
        drafts = [d[:longest] for d in drafts]
    started = time.perf_counter()
    if not longest:
        logits = forward(inputs[:, None], cache, last_logits=True)
        inputs = sample(logits, rows)
        mx.eval(inputs)
        if cost is not None:
            cost.observe(len(rows), len(rows), time.perf_counter() - started)
        for row, token in zip(rows, inputs.tolist()):
            row.kept([token], 0)
            out[row.seq_id] = [token]
        return out, inputs
    fed = [[t] + d + [0] * (longest - len(d)) for t, d in zip(inputs.tolist(), drafts)]
    logits = forward.every(mx.array(fed), cache)
    greedy = mx.argmax(logits, axis=-1)
    plain = [i for i, d in enumerate(drafts) if not d]
    first = sample(logits[mx.array(plain), 0], [rows[i] for i in plain]) if plain else None
    mx.eval(greedy, first)
    if cost is not None:
        cost.observe(len(rows), len(rows) * (longest + 1), time.perf_counter() - started)
    greedy, first = greedy.tolist(), dict(zip(plain, first.tolist() if plain else []))
    for i, (row, draft) in enumerate(zip(rows, drafts)):
        if i in first:
            kept = [first[i]]
        elif row.sampling.greedy:
            kept = _greedy_run(draft, greedy[i])
        else:
            kept = _sampled_run(draft, logits[i, : len(draft) + 1], row)
        row.kept(kept, len(draft))
        out[row.seq_id] = kept
        if draft:
            out.stats[row.seq_id] = (len(draft), len(kept) - 1)
    trim_rows(cache, [longest + 1 - len(out[row.seq_id]) for row in rows])
    return out, mx.array([out[row.seq_id][-1] for row in rows])


def critical(rows: list[Row]) -> list[bool]:
    """The rows the batch waits for: those expected to take (nearly) the most steps still."""
    left = [row.steps_left() for row in rows]
    return [n >= CRITICAL * max(left) for n in left]


def best_width(drafts: list[list[int]], acceptance: list[float], fixed: float, critical: list[bool]) -> int:
    """Tokens to feed each row this step (1: a plain step): the most tokens per unit of step cost.

    A step feeding each of B rows w tokens costs fixed + B * w. A row with a k-token draft keeps
    1 + a + ... + a^k tokens on average. A token kept early by a row the batch waits for
    (`critical`) saves a whole token's share of a step later. One kept by a row that should finish
    first saves less: the steps it leaves early cost the batch less without it (measured here, ~7
    of 122 ms a row for 8 rows at ~600 tokens: its attention and its share of every fed token),
    and it may yet become the row the batch waits for, as its rate is only an estimate. Such a
    token counts MINOR_WORTH. In an in-process A/B on the perf workloads (8 rows of ~600 tokens,
    speculation off and on alternating), counting it half instead of only its fed token's share
    (B / (fixed + B), ~0.2) was faster on 7 of 9 copy-heavy prompt sets and level on 2 (median
    1.49x of off against 1.32x), and on free text 1.24x against 1.18x (one of 4 sets 0.92x against
    1.00x); counting it whole lost on free text (1.13x). So with rows that cannot draft holding the
    batch, the step stays plain unless the others' drafts are long and likely.
    """
    rows = len(drafts)
    best, best_rate = 1, rows / (fixed + rows)  # a plain step's tokens per unit of cost
    for w in range(2, max(map(len, drafts), default=0) + 2):
        made = sum(1 + (1 if c else MINOR_WORTH) * (_expected(min(len(d), w - 1), a) - 1)
                   for d, a, c in zip(drafts, acceptance, critical))
        rate = made / (fixed + rows * w)
        if rate > best_rate:
            best, best_rate = w, rate
    return best


def _expected(k: int, a: float) -> float:
    """Tokens a row keeps from a k-token draft accepted token by token with probability a."""
    return sum(a ** i for i in range(k + 1))


def _greedy_run(draft: list[int], argmax: list[int]) -> list[int]:
    n = 0
    while n < len(draft) and draft[n] == argmax[n]:
        n += 1
    return draft[:n] + [argmax[n]]


def _sampled_run(draft: list[int], logits: Any, row: Row) -> list[int]:
    """The speculative sampling rule over one row's draft; logits [len(draft) + 1, V].

    At each position the row samples exactly as a plain step would (same distribution, same next
    key of its chain) and keeps the draft token only if the sample equals it. That accepts draft
    token d with probability p(d), and a rejection's sample is p conditioned on not being d, i.e.
    the residual p with d removed, renormalised: the standard rule for a deterministic draft. As
    every kept token is the sample plain decoding would have drawn with that key, a seed gives the
    same tokens with speculation on or off, whatever each step's width.
    """
    kept = [sample_row(logits[:1], row).item()]
    while len(kept) <= len(draft) and kept[-1] == draft[len(kept) - 1]:  # the draft so far held
        kept.append(sample_row(logits[len(kept) : len(kept) + 1], row).item())
    return kept
