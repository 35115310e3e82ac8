"""The decode step of the running batch, with prompt-lookup speculation (on the MLX thread only).

Without drafts, a step feeds each row its latest token and samples one more. When some rows have a
draft (draft.py), the step feeds every row its latest token and its draft, right-padded to the
longest, in one forward pass with logits at every position, and keeps for each row the longest
verified run plus one token sampled from the model:

- greedy rows keep draft tokens while each equals the argmax at its position, then the argmax;
- sampled rows use the speculative sampling rule for a deterministic draft: draft token d at a
  position is kept with probability p(d) under the row's own distribution there (temperature,
  top-k, top-p); on rejection the token comes from p with d removed, renormalised; when the whole
  draft is kept, one more from the next position. The output distribution is plain sampling's;
- rows without a draft (grammar-constrained rows never draft) sample position 0 as a plain step.

The positions a row did not keep are dropped from its KV (batchkv.drop_last). A verify step
costs more than a plain one, and more so for a wide batch (measured: docs/DESIGN.md, "CPU facts"),
so drafts are bounded by `VERIFY_BUDGET` fed tokens a step across the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from semcache.engine.batchkv import drop_last
from semcache.engine.draft import Drafter
from semcache.engine.sampling import distribution, next_key, sample_batch
from semcache.engine.types import SamplingParams

# Fed tokens a verify step may cost across the batch (rows x (1 + longest draft)). Measured on the
# embedded model (2 cores, perf spec): with 24, 8 concurrent copy-heavy turns ran at 0.81x of no
# speculation, as dropping rejected positions rolls each row's whole KV (a copy per step); with 12,
# rows draft only in batches of up to 5, where the verify step stays cheap.
VERIFY_BUDGET = 12


@dataclass(eq=False)
class Row:
    """A sequence's sampling state (its PRNG key advances once per random draw) and its drafter."""

    seq_id: int
    sampling: SamplingParams
    key: Any = None
    left: int | None = None  # tokens it may still generate (None: no limit known here)
    drafter: Drafter | None = None

    def start(self, history: list[int], first: int, max_draft: int) -> None:
        """It has sampled its first token after `history`: draft from here on (unconstrained rows)."""
        self.left = None if self.left is None else self.left - 1
        if max_draft > 0 and self.sampling.constraint is None:
            self.drafter = Drafter(history + [first], max_draft)

    def draft(self, width: int) -> list[int]:
        room = width if self.left is None else min(width, self.left - 1)
        return self.drafter.draft(room) if self.drafter is not None else []

    def kept(self, tokens: list[int], drafted: int) -> None:
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
           budget: int = VERIFY_BUDGET) -> tuple[Verified, Any]:
    """One step for every row: (tokens each kept, the new inputs [B] not yet fed)."""
    out = Verified()
    width = budget // len(rows) - 1
    drafts = [row.draft(width) for row in rows] if width > 0 else []
    longest = max(map(len, drafts), default=0)
    if not longest:
        logits = forward(inputs[:, None], cache, last_logits=True)
        inputs = sample(logits, rows)
        mx.eval(inputs)
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
    drop_last(cache, [longest + 1 - len(out[row.seq_id]) for row in rows])
    return out, mx.array([out[row.seq_id][-1] for row in rows])


def _greedy_run(draft: list[int], argmax: list[int]) -> list[int]:
    n = 0
    while n < len(draft) and draft[n] == argmax[n]:
        n += 1
    return draft[:n] + [argmax[n]]


def _sampled_run(draft: list[int], logits: Any, row: Row) -> list[int]:
    """The speculative sampling rule over one row's draft; logits [len(draft) + 1, V]."""
    probs = distribution(logits, row.sampling)
    for n, token in enumerate(draft):
        p = probs[n]
        if mx.random.uniform(key=next_key(row)).item() < p[token].item():
            continue
        residual = mx.where(mx.arange(p.shape[0]) == token, 0.0, p)
        return draft[:n] + [mx.random.categorical(mx.log(residual), key=next_key(row)).item()]
    return draft + [mx.random.categorical(mx.log(probs[len(draft)]), key=next_key(row)).item()]
