"""Prompt-lookup speculative decoding in the batch: exact for greedy rows, plain sampling's
distribution for sampled ones, and within each row's token limit."""

import collections

import mlx.core as mx
import pytest
from mlx_lm.models import llama

from semcache.engine.batch import Batcher
from semcache.engine.draft import Drafter
from semcache.engine.stepcost import StepCost
from semcache.engine.types import Admission, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def small_vocab_model(vocab: int, seed: int = 0):
    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                           vocab_size=vocab, rope_traditional=True, tie_word_embeddings=True)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def repetitive_prompts(count: int, vocab: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so n-gram lookup finds drafts, of varied lengths."""
    out = []
    for i in range(count):
        phrase = [(7 * i + 3 * j) % (vocab - 3) + 3 for j in range(4 + i % 5)]
        out.append(phrase * (2 + i % 3) + [(i * 11) % (vocab - 3) + 3])
    return out


def generate(batcher: Batcher, admissions: list[Admission], n: int) -> tuple[dict[int, list[int]], list]:
    """Step until every sequence has n tokens (releasing each as it is done); every step's stats."""
    out = {a.seq_id: [] for a in admissions}
    admit, release, stats = list(admissions), [], []
    while admit or batcher.decoding.rows or batcher.prefills:
        result = batcher.step(admit, release)
        admit, release = [], []
        stats.append(result.verified)
        for seq_id, token in result.tokens.items():
            out[seq_id] += [token] + result.more.get(seq_id, [])
            if len(out[seq_id]) >= n:
                release.append(seq_id)
    return out, stats


@pytest.fixture(scope="module")
def model():
    return small_vocab_model(512)


@pytest.mark.parametrize("together", [1, 8], ids=["alone", "batch-of-8"])
def test_greedy_output_is_token_identical_with_and_without_speculation(model, together):
    prompts = repetitive_prompts(20, 512)
    runs = {}
    for max_draft in (0, 5):
        batcher = Batcher(model, prefill_chunk=64, max_draft=max_draft)
        batcher.step_cost = StepCost(default=1e6, learn=False)  # every draft pays: always verify
        tokens, stats = {}, []
        for start in range(0, len(prompts), together):
            group = [Admission(i, prompts[i], GREEDY, max_new=24) for i in range(start, min(start + together, len(prompts)))]
            got, step_stats = generate(batcher, group, 24)
            tokens.update(got)
            stats += step_stats
        runs[max_draft] = tokens, stats
    plain, spec = runs[0][0], runs[5][0]
    assert spec == plain
    assert all(len(t) == 24 for t in spec.values())  # max_new holds: no run goes past it
    accepted = sum(a for step in runs[5][1] for _d, a in step.values())
    assert accepted > 20  # drafts were verified and kept, not just skipped
    assert not any(runs[0][1])


def test_drafter_proposes_what_followed_the_longest_match():
    d = Drafter([1, 2, 3, 4, 9, 2, 3, 5], max_draft=3)
    d.extend([1, 2, 3])
    assert d.draft(3) == [4, 9, 2]  # "1 2 3" matched at the start, longer than "2 3" later
    assert d.draft(1) == [4]
    assert d.acceptance() == pytest.approx(2 / 3)  # the prior, before any verdict
    d.verified(3, 0)
    assert d.acceptance() == pytest.approx(2 / 4)
    d.verified(3, 3)
    assert d.acceptance() == pytest.approx(5 / 7)
    for _ in range(30):
        d.verified(1, 0)
    assert not d.enabled and d.draft(3) == []  # too few accepted: it stops drafting


def exact_joint(model, prompt: list[int], vocab: int) -> dict[tuple, float]:
    """Plain sampling's exact distribution of the first three tokens (temperature 1), by enumeration."""
    def probs(prefixes):
        logits = model(mx.array([prompt + list(p) for p in prefixes]))[:, -1, :]
        return mx.softmax(logits.astype(mx.float32), axis=-1).tolist()

    first = probs([()])[0]
    pairs = [(a,) for a in range(vocab)]
    second = dict(zip(pairs, probs(pairs)))
    triples = [(a, b) for a in range(vocab) for b in range(vocab)]
    third = dict(zip(triples, probs(triples)))
    return {(a, b, c): first[a] * second[(a,)][b] * third[(a, b)][c]
            for a in range(vocab) for b in range(vocab) for c in range(vocab)}


def sampled(model, prompt: list[int], max_draft: int, seeds: range) -> tuple[collections.Counter, int]:
    batcher = Batcher(model, prefill_chunk=64, max_draft=max_draft)
    batcher.step_cost = StepCost(default=1e6, learn=False)  # every draft pays: always verify
    counts, accepted = collections.Counter(), 0
    for start in range(seeds.start, seeds.stop, 8):
        group = [Admission(s, prompt, SamplingParams(temperature=1.0, seed=s), max_new=3) for s in range(start, start + 8)]
        out, stats = generate(batcher, group, 3)
        counts.update(tuple(t) for t in out.values())
        accepted += sum(a for step in stats for _d, a in step.values())
    return counts, accepted


def test_sampled_speculation_keeps_plain_samplings_distribution():
    """Total variation against the exact distribution: speculative sampling is no further from it
    than plain sampling with as many samples (a biased rule, e.g. keeping every draft, is far off)."""
    vocab, n = 8, 1600
    model = small_vocab_model(vocab, seed=3)
    prompt = [a for a in range(vocab) for b in range(vocab) for a in (a, b)]  # every bigram: drafts always match
    exact = exact_joint(model, prompt, vocab)

    def tv(counts, at=None):
        """Total variation of the whole 3-token sequence, or of the token at position `at` alone
        (fewer outcomes: a small bias, e.g. a rejection resampling the draft token, shows)."""
        key = (lambda k: k) if at is None else (lambda k: k[at])
        want, got = collections.Counter(), collections.Counter()
        for k, p in exact.items():
            want[key(k)] += p
        for k, c in counts.items():
            got[key(k)] += c / n
        return 0.5 * sum(abs(got[k] - p) for k, p in want.items())

    plain, _ = sampled(model, prompt, 0, range(0, n))
    spec, accepted = sampled(model, prompt, 3, range(n, 2 * n))
    assert sum(spec.values()) == n and accepted > n // 20  # drafts were made, and some kept
    for at, slack in ((None, 0.03), (1, 0.015), (2, 0.015)):
        assert tv(spec, at) < max(1.5 * tv(plain, at), tv(plain, at) + slack), (at, tv(spec, at), tv(plain, at))


def test_a_seed_gives_the_same_tokens_with_speculation_on_or_off_at_any_width(model):
    """Each position is sampled as a plain step would with the same key, so neither speculation
    nor how wide a step is (it follows measured step times) changes what a seed produces."""
    prompts = repetitive_prompts(6, 512)
    params = [SamplingParams(temperature=0.2, seed=11 + i, top_p=0.95 if i % 2 else 1.0) for i in range(6)]
    runs, accepted = [], 0
    for max_draft, fixed in ((0, 10.0), (4, 1e6), (4, 10.0), (6, 3.0)):
        batcher = Batcher(model, prefill_chunk=64, max_draft=max_draft)
        batcher.step_cost = StepCost(default=fixed, learn=False)
        out, stats = generate(batcher, [Admission(i, prompts[i], params[i], max_new=24) for i in range(6)], 24)
        runs.append(out)
        accepted += sum(a for step in stats for _d, a in step.values())
    assert all(run == runs[0] for run in runs[1:])
    assert accepted > 20  # drafts were verified and kept


class OddTokensOnly:
    """A stand-in grammar: allows odd token ids only, and records what it advanced by."""

    def __init__(self):
        self.advanced = []

    def allowed(self, width):
        import numpy as np

        return np.arange(width) % 2 == 1

    def advance(self, token):
        self.advanced.append(token)


def test_a_constrained_row_does_not_draft_and_its_grammar_sees_every_token_once(model):
    """Constrained rows never speculate (their grammar state advances per sampled token and would
    have to be rolled back on a rejection); the rows beside them still do."""
    from dataclasses import replace

    constraint = OddTokensOnly()
    prompts = repetitive_prompts(3, 512)
    batcher = Batcher(model, prefill_chunk=64, max_draft=4)
    batcher.step_cost = StepCost(default=1e6, learn=False)  # every draft pays: always verify
    admit = [Admission(0, prompts[0], replace(GREEDY, constraint=constraint), max_new=20),
             Admission(1, prompts[1], GREEDY, max_new=20), Admission(2, prompts[2], GREEDY, max_new=20)]
    out, stats = generate(batcher, admit, 20)
    assert all(t % 2 == 1 for t in out[0]) and constraint.advanced == out[0]
    assert not any(0 in step for step in stats)
    assert any(1 in step or 2 in step for step in stats)
