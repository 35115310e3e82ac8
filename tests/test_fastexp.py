"""Verify steps' CPU attention and SwiGLU (semcache.engine.fastexp): the exp they use, the attention
against mx.fast's for every mask mlx-lm passes, SwiGLU against mlx-lm's, that both run only inside
verify steps, and that their compiled functions stay bounded."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from semcache.engine import fastexp
from semcache.engine.forward import Forward
from semcache.engine.raggedkv import RaggedKV
from tests.test_speculative import small_vocab_model


def test_exp_is_within_float32_rounding_down_to_underflow():
    x = mx.concatenate([mx.linspace(-100.0, 0.0, 200_001), mx.array([0.0, -1e-30, -87.0, -mx.inf])])
    want = np.exp(np.array(x, dtype=np.float64))
    got = np.array(fastexp.exp_nonpositive(x), dtype=np.float64)
    normal = want > 1e-37
    assert np.max(np.abs(got - want)[normal] / want[normal]) < 2e-7
    assert np.all(got[~normal] < 1.01e-37) and got[-4] == 1.0 and got[-1] < 2e-38  # -inf: ~1.6e-38


MASKS = ["none", "causal", "bool-row", "bool-head", "additive", "bool-2d"]


@pytest.mark.parametrize("queries", [2, 3, 9])
@pytest.mark.parametrize("kind", MASKS)
def test_matches_fast_attention_for_every_mask_kind(queries, kind):
    mx.random.seed(queries)
    B, Hq, Hk, S, D = 3, 6, 2, 37, 16
    q, k, v = mx.random.normal((B, Hq, queries, D)), mx.random.normal((B, Hk, S, D)), mx.random.normal((B, Hk, S, D))
    mask = {"none": None, "causal": "causal",
            "bool-row": mx.random.uniform(shape=(B, 1, queries, S)) > 0.4,
            "bool-head": mx.random.uniform(shape=(B, Hq, queries, S)) > 0.4,
            "additive": mx.random.normal((B, 1, queries, S)),
            "bool-2d": mx.random.uniform(shape=(queries, S)) > 0.4}[kind]
    if isinstance(mask, mx.array) and mask.dtype == mx.bool_:
        mask = mask | (mx.arange(S) == 0)  # every query sees at least one key
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = fastexp.attention(q, k, v, 0.25, mask)
    assert got.shape == want.shape and mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()


def test_masked_keys_do_not_leak_even_with_huge_values():
    B, H, L, S, D = 2, 4, 3, 20, 8
    q, k = mx.random.normal((B, H, L, D)), mx.random.normal((B, H, S, D))
    keep = mx.arange(S) < 12
    v = mx.where(keep[None, None, :, None], mx.random.normal((B, H, S, D)), 1e30)
    got = fastexp.attention(q, k, v, 0.3, mx.broadcast_to(keep, (B, 1, L, S)))
    want = mx.fast.scaled_dot_product_attention(q, k[..., :12, :], v[..., :12, :], scale=0.3)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()


def test_swiglu_matches_mlx_lm_over_the_whole_range():
    gate = mx.concatenate([mx.linspace(-120.0, 120.0, 4000), mx.random.normal((4000,)) * 3]).reshape(2, 4, -1)
    x = mx.random.normal(gate.shape)
    got, want = fastexp.swiglu(gate, x), mlx_lm_swiglu(gate, x)
    assert mx.allclose(got, want, rtol=1e-6, atol=1e-6).item() and not mx.isnan(got).any().item()


def test_compiled_functions_stay_bounded():
    for s in range(40):
        x = mx.random.normal((2, 3, 1, 2, 10 + s))
        mx.eval(fastexp._shifted_exp(x, x.max(-1, keepdims=True)))
    assert len(fastexp._compiled) <= fastexp._KEEP


def test_used_only_in_verify_steps_and_logits_agree(monkeypatch):
    model = small_vocab_model(200, seed=3)
    forward = Forward(model)
    calls, glu = [], []
    real, real_glu = fastexp.attention, fastexp.swiglu
    monkeypatch.setattr(fastexp, "attention", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(fastexp, "swiglu", lambda *a: glu.append(a[0].shape) or real_glu(*a))
    prompt = mx.array([[5, 9, 31, 7, 40, 41, 42, 43], [2, 8, 8, 100, 3, 4, 5, 6]])

    def run(verify: bool):
        cache = [RaggedKV([0, 0]) for _ in model.layers]
        forward(prompt, cache, last_logits=False)  # prefill: mlx-lm's attention
        forward(mx.array([[11], [12]]), cache, last_logits=True)  # plain decode: mlx-lm's attention
        fed = mx.array([[13, 14, 15], [16, 17, 18]])
        return forward.every(fed, cache) if verify else forward.model(fed, cache=cache)

    plain = run(verify=False)
    assert calls == [] and glu == []
    verified = run(verify=True)
    assert calls and all(shape[2] == 3 for shape in calls)  # only the 3-token verify step
    assert len(glu) == len(model.layers) and all(shape[:2] == (2, 3) for shape in glu)
    assert mx.allclose(verified, plain, rtol=1e-4, atol=1e-4).item()
    assert mx.array_equal(verified.argmax(-1), plain.argmax(-1)).item()
