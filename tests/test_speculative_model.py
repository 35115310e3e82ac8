"""Speculative decoding on the embedded model: greedy answers are token-identical with it on or off,
for 20 prompts (copy-heavy and free), one at a time and 8 at a time."""

import pytest

from perf.spec_workloads import copy_heavy, free
from semcache.engine.types import Admission, SamplingParams
from tests.test_speculative import generate

pytestmark = [pytest.mark.model, pytest.mark.slow]
TOKENS = 40


@pytest.fixture(scope="module")
def loaded():
    from semcache.engine.models import load_model

    return load_model(None)


def twenty_prompts(tokenizer) -> list[list[int]]:
    from semcache.text.chat import ChatMessage, PromptRenderer

    texts = [p for salt in range(4) for p in copy_heavy(salt)] + [p for salt in range(3) for p in free(salt)]
    render = PromptRenderer(tokenizer).render
    return [render([ChatMessage("user", t)]) for t in texts[:20]]


@pytest.mark.parametrize("together", [1, 8], ids=["alone", "batch-of-8"])
def test_greedy_answers_are_identical_with_speculation(loaded, together):
    from semcache.engine.batch import Batcher

    prompts = twenty_prompts(loaded.tokenizer)
    greedy = SamplingParams(temperature=0.0)
    answers, accepted = {}, 0
    for max_draft in (0, 5):
        batcher = Batcher(loaded.model, prefill_chunk=256, max_draft=max_draft)
        got = {}
        for start in range(0, len(prompts), together):
            ids = range(start, min(start + together, len(prompts)))
            out, stats = generate(batcher, [Admission(i, prompts[i], greedy, max_new=TOKENS) for i in ids], TOKENS)
            got.update(out)
            accepted += sum(a for step in stats for _d, a in step.values())
        answers[max_draft] = got
    mismatched = [i for i in answers[0] if answers[0][i] != answers[5][i]]
    assert not mismatched, [loaded.tokenizer.decode(answers[0][i]) for i in mismatched[:2]]
    assert accepted > 0
