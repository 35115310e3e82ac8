"""The decode batch's ragged KV: rows that keep different numbers of verified tokens compute
exactly what each row alone would, with their rejected positions forgotten without a copy, through
re-alignment, rows leaving, rows joining and a row's KV copied out."""

import random

import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache

from semcache.engine import raggedkv
from semcache.engine.raggedkv import RaggedKV, trim_rows
from semcache.engine.stepcost import DEFAULT_FIXED, StepCost
from semcache.engine.types import SamplingParams
from semcache.engine.verify import Row, best_width, critical
from tests.test_speculative import small_vocab_model

VOCAB = 97
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return small_vocab_model(VOCAB, seed=3)


def prefilled(model, prompts: list[list[int]]) -> list[RaggedKV]:
    longest = max(map(len, prompts))
    padding = [longest - len(p) for p in prompts]
    cache = [BatchKVCache(padding) for _ in model.layers]
    model(mx.array([[0] * pad + p for pad, p in zip(padding, prompts)]), cache=cache)
    return [RaggedKV.adopt(c) for c in cache]


class Rows:
    """Sequences decoded together in a ragged batch, every logit they saw recorded against its position."""

    def __init__(self, model, prompts):
        self.model, self.seqs, self.seen = model, [list(p) for p in prompts], [[] for _ in prompts]
        self.cache = prefilled(model, prompts)

    def step(self, rng: random.Random, width: int) -> None:
        fed = [[rng.randrange(1, VOCAB) for _ in range(width)] for _ in self.seqs]
        logits = self.model(mx.array(fed), cache=self.cache)
        keep = [rng.randint(1, width) for _ in self.seqs]
        trim_rows(self.cache, [width - k for k in keep])
        for i, (tokens, k) in enumerate(zip(fed, keep)):
            self.seen[i] += [(len(self.seqs[i]) + j, logits[i, j]) for j in range(k)]
            self.seqs[i] += tokens[:k]

    def check(self) -> None:
        for seq, seen in zip(self.seqs, self.seen):
            full = self.model(mx.array([seq]))[0]
            for position, logits in seen:
                assert mx.allclose(logits, full[position], atol=1e-4).item(), position


@pytest.mark.parametrize("spread", [1000, 3], ids=["never-aligned", "often-aligned"])
def test_rows_that_keep_different_runs_compute_what_each_alone_would(model, monkeypatch, spread):
    monkeypatch.setattr(raggedkv, "MAX_SPREAD", spread)
    aligned = []
    align = RaggedKV.align
    monkeypatch.setattr(RaggedKV, "align", lambda self: (aligned.append(self.row_ends()), align(self)))
    rng = random.Random(spread)
    rows = Rows(model, [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27]])
    for _ in range(14):
        rows.step(rng, rng.randint(1, 5))
    assert bool(aligned) == (spread < 100)
    assert all(max(ends) - min(ends) > spread for ends in aligned)
    rows.check()


def test_rejected_positions_cost_no_copy(model):
    rows = Rows(model, [[1, 2, 3], [4, 5, 6, 7]])
    rows.step(random.Random(0), 4)
    keys, ends = rows.cache[0].keys, rows.cache[0].row_ends()
    trim_rows(rows.cache, [1, 0])
    assert rows.cache[0].keys is keys  # the same buffer: nothing moved
    assert rows.cache[0].row_ends() == [ends[0] - 1, ends[1]]


def test_rows_leave_and_join_a_ragged_batch_and_copy_out_exactly(model):
    rng = random.Random(7)
    rows = Rows(model, [[3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13]])
    for _ in range(5):
        rows.step(rng, 4)
    assert rows.cache[0].ends is not None  # ragged before the batch changes
    for c in rows.cache:  # the first row leaves
        c.filter([1, 2])
    rows.seqs, rows.seen = rows.seqs[1:], rows.seen[1:]
    joining = [30, 31, 32, 33]
    for mine, theirs in zip(rows.cache, prefilled(model, [joining])):
        mine.extend(theirs)
    rows.seqs.append(list(joining))
    rows.seen.append([])
    for _ in range(5):
        rows.step(rng, 3)
    rows.check()
    for i, seq in enumerate(rows.seqs):  # a row's KV copied out is its kept tokens' alone
        alone = [c.extract(i) for c in rows.cache]
        assert alone[0].offset == len(seq)
        logits = model(mx.array([[41]]), cache=alone)[0, -1]
        assert mx.allclose(logits, model(mx.array([seq + [41]]))[0, -1], atol=1e-4).item()


def test_the_width_saves_the_most_step_cost():
    every = [True] * 8
    CPU = 10.0  # a step's fixed part worth 10 fed tokens
    # One row, drafts accepted 90% of the time: a long draft pays for its fed tokens.
    assert best_width([[1] * 6], [0.9], CPU, [True]) == 7
    # Eight rows on a CPU pay for each fed token: short drafts only.
    assert best_width([[1] * 6] * 8, [0.9] * 8, CPU, every) in (3, 4, 5)
    # Drafts rarely accepted, or nobody drafting: a plain step.
    assert best_width([[1] * 6] * 8, [0.1] * 8, CPU, every) == 1
    assert best_width([[], []], [0.9, 0.9], CPU, [True, True]) == 1
    # The batch waits for rows that cannot draft: faster drafting rows save it no step.
    assert best_width([[1] * 6] * 4 + [[]] * 4, [0.95] * 8, CPU, [False] * 4 + [True] * 4) == 1
    # ...unless a step's fixed part is large enough (8 rows at ~600 tokens here: ~30 fed tokens):
    # a row that finishes sooner leaves cheaper steps behind it, so its long, likely drafts pay.
    assert best_width([[1] * 6] * 4 + [[]] * 4, [0.95] * 8, 40.0, [False] * 4 + [True] * 4) > 1
    # A step whose fixed part dominates (a GPU) verifies every draft whole.
    assert best_width([[1] * 6] * 8, [0.8] * 8, 500.0, every) == 7


def test_the_rows_the_batch_waits_for_are_those_with_the_most_steps_left():
    fast, slow, unbounded = Row(1, GREEDY, left=40), Row(2, GREEDY, left=40), Row(3, GREEDY)
    fast.steps, fast.made = 9, 39  # ~4 tokens a step: ~10 steps left, against 40
    assert critical([fast, slow]) == [False, True]
    assert critical([fast, slow, unbounded]) == [False, False, True]


def test_the_step_cost_is_learnt_per_batch_size_from_the_steps_seen():
    cost = StepCost()
    for _ in range(40):  # 8 rows: seconds = 0.05 + 0.002 * tokens, the fixed part worth 25 tokens
        for tokens in (8, 16, 32):
            cost.observe(8, tokens, 0.05 + 0.002 * tokens)
        for tokens in (1, 2, 4):  # 1 row: 0.06 + 0.01 * tokens, worth 6
            cost.observe(1, tokens, 0.06 + 0.01 * tokens)
    assert cost.fixed(8) == pytest.approx(25.0, rel=1e-3) and cost.fixed(1) == pytest.approx(6.0, rel=1e-3)
    assert cost.fixed(4) == DEFAULT_FIXED  # no steps of 4 rows yet: the measured default
    for _ in range(40):  # no spread in tokens fed: nothing to fit, the measured default
        cost.observe(3, 3, 0.1)
    assert cost.fixed(3) == DEFAULT_FIXED
    assert StepCost(learn=False).fixed(8) == DEFAULT_FIXED