"""Start daemons as subprocesses on 127.0.0.1: semcache (`running`, or `Daemon` where a port must be
proven ours, as on a machine shared with other runs) and the peer, mlx_lm.server on the same weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from perf.common import read_metrics

ROOT = Path(__file__).parent.parent
_PEER = (
    "import ctypes, sys\n"
    "try:\n    ctypes.CDLL('libopenblas.so.0', mode=ctypes.RTLD_GLOBAL)\nexcept OSError:\n    pass\n"
    "from mlx_lm.server import main\nsys.argv = ['mlx_lm.server'] + sys.argv[1:]\nmain()\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180, poll: float = 0.1) -> float:
    """Seconds until `url` answers 200; RuntimeError if `proc` exits first, TimeoutError after `timeout`."""
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
        time.sleep(poll)
    raise TimeoutError(url)


def terminate(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


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
        terminate(proc)


def semcache_cmd(port: int, cache_dir: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "semcache", "serve", "--port", str(port)]
    return cmd if cache_dir is None else cmd + ["--cache-dir", str(cache_dir)]


def peer_cmd(port: int, model_dir: Path) -> list[str]:
    return [sys.executable, "-c", _PEER, "--model", str(model_dir), "--port", str(port), "--host", "127.0.0.1"]


class Daemon:
    """`python -m semcache serve` on a free port, with its own cache folder and log file; kill() / stop()
    always leave no process behind (and are no-ops before start)."""

    def __init__(self, cache_dir: Path, log: Path, **env: str):
        self.cache_dir = cache_dir
        self.log = log
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.base = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> Daemon:
        """Spawn and wait until /health/ready is 200. Other processes on this machine pick free ports
        too, so the port only counts as ours once our own log says it is bound (a lost race to bind
        is retried on a new port): /health/ready can never be answered by someone else's server."""
        deadline = time.monotonic() + timeout
        for _ in range(3):
            self.port = free_port()
            self.base = f"http://127.0.0.1:{self.port}"
            with open(self.log, "w") as out:
                self.proc = subprocess.Popen(semcache_cmd(self.port, self.cache_dir), stdout=out,
                                             stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
            if self._wait_bound(deadline):
                self._wait_ready(deadline)
                return self
        raise RuntimeError(f"could not bind a free port in 3 tries:\n{self.log_tail()}")

    def _wait_bound(self, deadline: float) -> bool:
        bound = f"port bound: 127.0.0.1:{self.port}"
        while time.monotonic() < deadline:
            if bound in self.log_tail(None):
                return True
            if self.proc.poll() is not None:
                if "cannot bind" in self.log_tail():
                    return False
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"daemon did not bind its port in time:\n{self.log_tail()}")

    def _wait_ready(self, deadline: float) -> None:
        try:
            wait_http(self.base + "/health/ready", self.proc, deadline - time.monotonic(), poll=0.05)
        except RuntimeError:
            raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}") from None
        except TimeoutError:
            raise TimeoutError(f"daemon not ready in time:\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (no final writes, no cleanup)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, grace: float = 20) -> None:
        """Graceful SIGTERM, then SIGKILL if it does not exit within `grace` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            terminate(self.proc, grace)

    def log_tail(self, n: int | None = 4000) -> str:
        try:
            text = self.log.read_text(errors="replace")
            return text if n is None else text[-n:]
        except OSError:
            return ""

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return json.load(r)

    def metric(self, name: str, labels: str = "") -> float:
        samples = read_metrics(self.base)
        assert name + labels in samples, f"metric {name}{labels} not found in /metrics"
        return samples[name + labels]


@contextmanager
def daemon(workdir: Path, name: str, env: dict[str, str], timeout: float = 180):
    """A Daemon with `env` for one workload (cache folder and log in `workdir`, named after `name`),
    stopped with SIGTERM on exit."""
    d = Daemon(workdir / f"{name}-cache", workdir / f"{name}.log", **env)
    try:
        yield d.start(timeout)
    finally:
        d.stop(grace=30)


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
    args["max_position_embeddings"] = loaded.info.context_length
    (dest / "config.json").write_text(json.dumps(args, indent=1))
    loaded.tokenizer.save_pretrained(str(dest))
    return dest
