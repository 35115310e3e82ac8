"""Start semcache and the peer (mlx_lm.server on the same weights) as subprocesses on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

_PEER = (
    "import ctypes, sys\n"
    "try:\n    ctypes.CDLL('libopenblas.so.0', mode=ctypes.RTLD_GLOBAL)\nexcept OSError:\n    pass\n"
    "from mlx_lm.server import main\nsys.argv = ['mlx_lm.server'] + sys.argv[1:]\nmain()\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


@contextmanager
def running(cmd: list[str], ready_path: str, port: int, log: Path, env: dict | None = None):
    """Yield (base_url, pid, seconds to ready) for a server subprocess; stop it afterwards."""
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        base = f"http://127.0.0.1:{port}"
        seconds = wait_http(base + ready_path, proc)
        yield base, proc.pid, seconds
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def semcache_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "semcache", "serve", "--port", str(port)]


def peer_cmd(port: int, model_dir: Path) -> list[str]:
    return [sys.executable, "-c", _PEER, "--model", str(model_dir), "--port", str(port), "--host", "127.0.0.1"]


def export_embedded(dest: Path) -> Path:
    """Write the embedded GGUF as an mlx-lm folder (float32 weights, config, tokenizer + template)."""
    import mlx.core as mx
    import mlx.nn as nn

    import semcache  # noqa: F401  (loads OpenBLAS before mlx is used)
    from semcache.engine.models import load_model

    if (dest / "model.safetensors").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    loaded = load_model(None)
    weights = dict(nn.utils.tree_flatten(loaded.model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    args = {k: v for k, v in vars(loaded.model.args).items() if v is not None}
    args["max_position_embeddings"] = loaded.context_length
    (dest / "config.json").write_text(json.dumps(args, indent=1))
    loaded.tokenizer.save_pretrained(str(dest))
    return dest
