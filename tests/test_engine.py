"""MLXEngine on a tiny random llama (real tokenizer): batching and chunked prefill are exact enough.

Tolerance: float32 logits agree within 1e-4 absolute (batched matmuls sum in another order).
"""

import asyncio

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from semcache.cache.kvdata import KVData
from semcache.cache.layout import KVLayout
from semcache.engine.batch import Batcher
from semcache.engine.types import Admission, ModelInfo, SamplingParams
from semcache.engine.engine import MLXEngine
from semcache.engine.models import LoadedModel, kv_bytes_per_token, kv_layout

ATOL = 1e-4
GREEDY = SamplingParams(temperature=0.0)


def tiny_model(seed: int = 0):
    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                           vocab_size=49152, rope_traditional=True, tie_word_embeddings=True)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module", params=[7, 512], ids=["chunked-prefill", "grouped-prefill"])
def engine(tokenizer, request):
    def loader(_spec):
        model = tiny_model()
        info = ModelInfo("tiny", 512, frozenset({2}), kv_bytes_per_token(model, 4), fingerprint="tiny")
        return LoadedModel(model=model, tokenizer=tokenizer, info=info)

    eng = MLXEngine(None, prefill_chunk=request.param, loader=loader)
    asyncio.run(eng.load())
    yield eng
    asyncio.run(eng.close())


def prompts(tokenizer):
    texts = ["Hello there, how are you?", "A much longer prompt about the history of the Roman empire and its roads",
             "Short", "Numbers 1234567 and symbols !@#"]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def reference_logits(model, ids, steps):
    """Plain single-sequence loop: one-shot prefill, then greedy decode; logits of every step."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)[:, -1, :]
    out = [np.array(logits[0])]
    for _ in range(steps - 1):
        token = mx.argmax(logits, axis=-1)
        logits = model(token[:, None], cache=cache)[:, -1, :]
        out.append(np.array(logits[0]))
    return out


class TestTinyModel:
    def test_chunked_prefill_matches_one_shot(self, engine, tokenizer):
        """Prefill in chunks of 7 gives the same last-position logits as one call."""
        def run():
            ids = prompts(tokenizer)[1]
            one = engine.model(mx.array([ids]), cache=make_prompt_cache(engine.model))[0, -1]
            cache = make_prompt_cache(engine.model)
            for i in range(0, len(ids), 7):
                chunked = engine.model(mx.array([ids[i:i + 7]]), cache=cache)[0, -1]
            return np.array(one), np.array(chunked)

        one, chunked = engine._executor.submit(run).result()
        np.testing.assert_allclose(chunked, one, atol=ATOL)

    def test_batched_logits_match_single(self, engine, tokenizer):
        """Four sequences of different lengths decoded together match each decoded alone."""
        ps = prompts(tokenizer)
        steps = 6

        def batched():
            captured = {i: [] for i in range(len(ps))}
            orig = engine.batcher._sample

            def spy(logits, rows):
                for row, lg in zip(rows, np.array(logits)):
                    captured[row.seq_id].append(lg)
                return orig(logits, rows)

            engine.batcher._sample = spy
            try:
                admit = [Admission(i, p, GREEDY) for i, p in enumerate(ps)]
                while min(len(v) for v in captured.values()) < steps:
                    engine.batcher.step(admit, [])
                    admit = []
                engine.batcher.step([], list(range(len(ps))))
            finally:
                engine.batcher._sample = orig
            return captured

        captured = engine._executor.submit(batched).result()
        for i, p in enumerate(ps):
            ref = engine._executor.submit(reference_logits, engine.model, p, steps).result()
            for step in range(steps):
                np.testing.assert_allclose(captured[i][step], ref[step], atol=ATOL,
                                           err_msg=f"sequence {i}, step {step}")

    def test_release_mid_batch_keeps_others_exact(self, engine, tokenizer):
        """Dropping one sequence from the batch does not disturb the tokens of the others."""
        ps = prompts(tokenizer)

        def run():
            tokens = {i: [] for i in range(3)}
            admit = [Admission(i, ps[i], GREEDY) for i in range(3)]
            for step in range(12):
                out = engine.batcher.step(admit, [1] if step == 5 else []).tokens
                admit = []
                for k, v in out.items():
                    tokens[k].append(v)
            engine.batcher.step([], [0, 2])
            return tokens

        tokens = engine._executor.submit(run).result()
        for i in (0, 2):
            ref = engine._executor.submit(reference_logits, engine.model, ps[i], len(tokens[i])).result()
            assert tokens[i] == [int(np.argmax(r)) for r in ref]

    def test_seeded_sampling_is_reproducible(self, engine, tokenizer):
        """The same seed gives the same sampled tokens; another seed (almost surely) differs."""
        p = prompts(tokenizer)[0]

        def sample(seed, seq_id):
            params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=seed)
            out = []
            admit = [Admission(seq_id, p, params)]
            for _ in range(8):
                out.append(engine.batcher.step(admit, []).tokens[seq_id])
                admit = []
            engine.batcher.step([], [seq_id])
            return out

        a = engine._executor.submit(sample, 42, 100).result()
        b = engine._executor.submit(sample, 42, 101).result()
        c = engine._executor.submit(sample, 7, 102).result()
        assert a == b and a != c

    def test_short_prompt_is_not_held_behind_a_long_one(self, engine, tokenizer):
        """A short prompt admitted after a long one gets its first token before the long prefill ends."""
        long_ids = tokenizer.encode("word " * (3 * engine.prefill_chunk), add_special_tokens=False)
        short_ids = prompts(tokenizer)[2]

        def run():
            first_token_step = {}
            admit = [Admission(1, long_ids, GREEDY), Admission(2, short_ids, GREEDY)]
            for step in range(40):
                for seq_id in engine.batcher.step(admit, []).tokens:
                    first_token_step.setdefault(seq_id, step)
                admit = []
                if len(first_token_step) == 2:
                    break
            engine.batcher.step([], [1, 2])
            return first_token_step

        steps = engine._executor.submit(run).result()
        assert steps[2] == 0 and steps[1] > 0

    def test_top_p_zero_is_greedy(self, engine, tokenizer):
        """top_p=0 keeps only the most likely token, at any temperature."""
        from semcache.engine.batch import Row
        from semcache.engine.sampling import sample_row

        logits = mx.array([[0.0, 5.0, 1.0, 2.0]])
        row = Row(1, SamplingParams(temperature=1.0, top_p=0.0, seed=3))
        picks = engine._executor.submit(lambda: [sample_row(logits, row).item() for _ in range(20)]).result()
        assert picks == [1] * 20

    def test_kv_bytes_per_token(self, engine):
        """K and V, every layer, every KV head, float32."""
        assert kv_bytes_per_token(engine.model, 4) == 2 * 2 * 2 * 16 * 4


class TestCachedPrefix:
    def test_hit_gives_the_logits_of_a_cold_run(self, engine, tokenizer):
        """A sequence started from another's stored KV (prompt and reply, taken out of a batch of
        three) decodes with the logits of a cold run of its whole prompt, and the entry is untouched."""
        ps = prompts(tokenizer)
        steps = 5

        def run():
            admit = [Admission(i, p, GREEDY) for i, p in enumerate(ps[:3])]
            produced = {i: [] for i in range(3)}
            for _ in range(6):
                for seq_id, token in engine.batcher.step(admit, []).tokens.items():
                    produced[seq_id].append(token)
                admit = []
            kept = engine.batcher.step([], [0, 1, 2], keep=[1]).kept[1]
            covered = ps[1] + produced[1][:-1]  # the last sampled token was never fed
            assert kept.num_tokens == len(covered)
            before = [np.array(k, copy=True) for k, _ in kept.layers]
            prompt = covered + tokenizer.encode(" and then the roads", add_special_tokens=False)
            captured = []
            orig = engine.batcher._sample

            def spy(logits, rows):
                captured.extend(np.array(lg) for row, lg in zip(rows, logits) if row.seq_id == 9)
                return orig(logits, rows)

            engine.batcher._sample = spy
            try:
                admit = [Admission(9, prompt, GREEDY, prefix=kept.prefix(len(covered)))]
                while len(captured) < steps:
                    engine.batcher.step(admit, [])
                    admit = []
                engine.batcher.step([], [9])
            finally:
                engine.batcher._sample = orig
            unchanged = all(np.array_equal(a, k) for a, (k, _) in zip(before, kept.layers))
            return prompt, captured, unchanged

        prompt, captured, unchanged = engine._executor.submit(run).result()
        assert unchanged, "a running sequence wrote into a stored entry"
        ref = engine._executor.submit(reference_logits, engine.model, prompt, steps).result()
        for step in range(steps):
            np.testing.assert_allclose(captured[step], ref[step], atol=ATOL, err_msg=f"step {step}")

    def test_hits_admitted_together_finish_in_one_batch_exactly(self, engine, tokenizer):
        """Two sequences resuming from different cached prefixes (of different lengths) are finished
        in one batched pass and then decode with the logits of their cold runs."""
        ps = prompts(tokenizer)
        steps = 4
        tail = tokenizer.encode(" so", add_special_tokens=False)

        def run():
            admit = [Admission(i, p, GREEDY) for i, p in enumerate(ps[:2])]
            started = set()
            while started != {0, 1}:  # both prompts prefilled and decoding
                started |= set(engine.batcher.step(admit, []).tokens)
                admit = []
            kept = engine.batcher.step([], [0, 1], keep=[0, 1]).kept
            captured = {10: [], 11: []}
            orig = engine.batcher._sample

            def spy(logits, rows):
                for row, lg in zip(rows, logits):
                    if row.seq_id in captured:
                        captured[row.seq_id].append(np.array(lg))
                return orig(logits, rows)

            engine.batcher._sample = spy
            full = {}
            try:
                admit = []
                for seq_id, source in ((10, 0), (11, 1)):
                    full[seq_id] = ps[source] + tail * (1 + source)  # suffixes of different lengths
                    n = len(ps[source])  # the prompt's KV (the entry also holds sampled tokens)
                    admit.append(Admission(seq_id, full[seq_id], GREEDY, prefix=kept[source].prefix(n)))
                first_step = engine.batcher.step(admit, []).tokens
                while min(len(v) for v in captured.values()) < steps:
                    engine.batcher.step([], [])
                engine.batcher.step([], [10, 11])
            finally:
                engine.batcher._sample = orig
            return full, captured, set(first_step)

        full, captured, first = engine._executor.submit(run).result()
        assert first == {10, 11}, "both hits should get their first token in the same step"
        for seq_id, prompt in full.items():
            ref = engine._executor.submit(reference_logits, engine.model, prompt, steps).result()
            for step in range(steps):
                np.testing.assert_allclose(captured[seq_id][step], ref[step], atol=ATOL,
                                           err_msg=f"sequence {seq_id}, step {step}")


class TestRejectedHits:
    """A hit whose KV the model cannot take (a planted or damaged entry that got this far) fails its
    own row, not the batch: the row runs from scratch, exactly, and the step reports it rejected."""

    def greedy_tokens(self, batcher, admit, steps: int) -> tuple[dict[int, list[int]], set[int]]:
        """Step until every admitted sequence has `steps` tokens; (tokens, rejected seq_ids)."""
        tokens = {a.seq_id: [] for a in admit}
        rejected: set[int] = set()
        for _ in range(200):
            if min(map(len, tokens.values())) >= steps:
                break
            result = batcher.step(admit, [])
            admit = []
            rejected |= result.rejected
            for seq_id, token in result.tokens.items():
                tokens[seq_id].append(token)
        batcher.step([], list(tokens))
        return {k: v[:steps] for k, v in tokens.items()}, rejected

    def cold(self, engine, prompt: list[int], steps: int) -> list[int]:
        ref = engine._executor.submit(reference_logits, engine.model, prompt, steps).result()
        return [int(np.argmax(r)) for r in ref]

    @staticmethod
    def bad_kv(num_tokens: int, heads: int = 1, head_dim: int = 16, dtype: str = "float32") -> KVData:
        """The tiny model's KV has 2 kv heads of dim 16 in float32 per layer."""
        a = np.zeros((1, heads, num_tokens, head_dim), dtype)
        return KVData(((a, a), (a, a)), dtype)

    def test_a_hit_that_fails_in_the_model_runs_cold_next_to_a_healthy_row(self, engine, tokenizer):
        """A hit with one kv head (the model has two) next to a cold prompt: no exception, both answer
        as cold runs, only the hit is reported rejected."""
        ps = prompts(tokenizer)
        bad = ps[1] + ps[0]
        admit = [Admission(20, bad, GREEDY, prefix=self.bad_kv(len(ps[1]))), Admission(21, ps[2], GREEDY)]
        tokens, rejected = engine._executor.submit(self.greedy_tokens, engine.batcher, admit, 4).result()
        assert rejected == {20}
        assert tokens[20] == self.cold(engine, bad, 4) and tokens[21] == self.cold(engine, ps[2], 4)

    def test_a_bad_hit_in_a_group_of_hits_leaves_the_good_one_served(self, engine, tokenizer):
        """Two hits prefilled as one group, one of them bad (head dim 8: the group's merge fails): the
        group retries each alone; the good one resumes its prefix (not rejected), the bad one runs
        cold; both answer exactly."""
        ps = prompts(tokenizer)
        tail = tokenizer.encode(" so", add_special_tokens=False)

        def run():
            admit = [Admission(0, ps[0], GREEDY)]
            while not engine.batcher.step(admit, []).tokens:
                admit = []
            kept = engine.batcher.step([], [0], keep=[0]).kept[0]
            good = Admission(30, ps[0] + tail, GREEDY, prefix=kept.prefix(len(ps[0])))
            bad = Admission(31, ps[3] + tail, GREEDY, prefix=self.bad_kv(len(ps[3]), heads=2, head_dim=8))
            return self.greedy_tokens(engine.batcher, [good, bad], 3)

        tokens, rejected = engine._executor.submit(run).result()
        assert rejected == {31}
        assert tokens[30] == self.cold(engine, ps[0] + tail, 3) and tokens[31] == self.cold(engine, ps[3] + tail, 3)

    def test_a_hit_not_of_the_models_layout_is_refused_before_mlx_sees_it(self, engine, tokenizer):
        """With the model's layout known (as a loaded model's is), a hit of another dtype (which MLX
        would silently promote) is refused at admission: rejected, run cold."""
        ps = prompts(tokenizer)
        layout = engine._executor.submit(kv_layout, engine.model).result()
        assert layout == KVLayout(((2, 16, 16), (2, 16, 16)), "float32")
        prompt = ps[1] + ps[0]

        def run():
            batcher = Batcher(engine.model, engine.prefill_chunk, layout)
            admit = [Admission(40, prompt, GREEDY, prefix=self.bad_kv(len(ps[1]), heads=2, dtype="float16"))]
            return self.greedy_tokens(batcher, admit, 3)

        tokens, rejected = engine._executor.submit(run).result()
        assert rejected == {40} and tokens[40] == self.cold(engine, prompt, 3)


class TestConstrainedSampling:
    def test_a_constrained_row_follows_its_grammar_and_leaves_the_others_alone(self, engine, tokenizer):
        """A tool_choice grammar on one row of a batch: that row writes exactly one valid call and then
        EOS (a random model would never), the other rows decode as if alone."""
        from dataclasses import replace

        from semcache.text.grammar import Grammars
        from semcache.text.tools import FALLBACK, CallScanner, Tool, ToolChoice

        tool = Tool("pick", "", {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}},
                                 "required": ["unit"], "additionalProperties": False})
        constraint = Grammars(tokenizer, {2}).for_tools(FALLBACK, [tool], ToolChoice("tool", "pick", parallel=False))
        ps = prompts(tokenizer)

        def run():
            tokens = {i: [] for i in range(3)}
            params = [GREEDY, replace(GREEDY, constraint=constraint), GREEDY]
            admit = [Admission(i, ps[i], params[i]) for i in range(3)]
            for _ in range(40):
                for k, v in engine.batcher.step(admit, []).tokens.items():
                    tokens[k].append(v)
                admit = []
            engine.batcher.step([], [0, 1, 2])
            return tokens

        tokens = engine._executor.submit(run).result()
        assert 2 in tokens[1], tokenizer.decode(tokens[1])
        call = tokens[1][: tokens[1].index(2)]  # up to EOS
        scanner = CallScanner(FALLBACK, [tool], "toolu_")
        scanner.feed(tokenizer.decode(call))
        scanner.flush()
        assert [(c.name, set(c.arguments)) for c in scanner.calls] == [("pick", {"unit"})]
        for i in (0, 2):
            ref = engine._executor.submit(reference_logits, engine.model, ps[i], len(tokens[i])).result()
            assert tokens[i] == [int(np.argmax(r)) for r in ref]


def test_a_failed_step_restarts_the_batch_but_keeps_what_was_learnt_of_the_model(engine, tokenizer):
    """The batch is rebuilt clean after a failure; its forward pass (which timed the head at load)
    and the measured step cost carry over instead of being measured again."""
    before = engine.batcher

    def fail(*_args):
        raise RuntimeError("boom")

    before.step = fail
    with pytest.raises(RuntimeError):
        asyncio.run(engine.step([Admission(99, prompts(tokenizer)[2], GREEDY, max_new=2)], []))
    after = engine.batcher
    assert after is not before and not after.decoding.rows and not after.prefills
    assert after._forward is before._forward and after.step_cost is before.step_cost
