"""The forward pass's vocabulary projection: a transposed copy of the head is kept only when it
measures faster here, and either way the logits are the model's own."""

import mlx.core as mx
import pytest

from semcache.engine import forward as forward_mod
from semcache.engine.forward import Forward
from tests.test_speculative import small_vocab_model


@pytest.mark.parametrize("copy_faster", [True, False], ids=["copy-kept", "copy-dropped"])
def test_the_head_copy_is_kept_only_when_faster_and_logits_match_the_model(monkeypatch, copy_faster):
    model = small_vocab_model(300, seed=5)
    calls = []

    def timed(project, weight):
        calls.append(project)
        return 1.0 if (len(calls) == 1) == copy_faster else 2.0  # the copy is timed first

    monkeypatch.setattr(forward_mod, "_seconds", timed)
    f = Forward(model)
    assert len(calls) == 2 and (f._head_t is not None) == copy_faster
    tokens = mx.array([[5, 9, 31, 7], [2, 8, 8, 100]])
    hidden = model.model(tokens)
    own = model.lm_head(hidden) if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear(hidden)
    assert mx.array_equal(f.head(hidden), own).item()
    # verify steps' attention (fastexp.py) agrees to float32 rounding
    assert mx.allclose(f.every(tokens, None), model(tokens), rtol=1e-4, atol=1e-4).item()

