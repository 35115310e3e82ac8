"""Model hot-swap time on an idle daemon: POST /admin/model between the embedded GGUF
and the same weights exported as an mlx-lm folder (a different fingerprint), `runs` times each way.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from perf import servers
from perf.common import machine_info

ADMIN = "perf-admin-key"


def post(base: str, path: str, body: dict, key: str | None = None, timeout: float = 300) -> dict:
    headers = {"content-type": "application/json", **({"x-api-key": key} if key else {})}
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def models(base: str) -> list[str]:
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
        return [m["id"] for m in json.loads(r.read())["data"]]


def configure(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("perf-swap.json"))
    parser.add_argument("--runs", type=int, default=3)


def main(args) -> dict:
    return run(args.out, runs=args.runs)


def run(out: Path, runs: int = 3) -> dict:
    from semcache.engine.models import embedded_model_path

    gguf = str(embedded_model_path())
    swaps = []
    with tempfile.TemporaryDirectory(prefix="semcache-perf-swap-") as tmp:
        folder = str(servers.export_embedded(Path(tmp) / "mlx-model"))
        port = servers.free_port()
        cmd = servers.semcache_cmd(port, Path(tmp) / "cache")
        env = {"SEMCACHE_ADMIN_KEY": ADMIN}
        with servers.running(cmd, "/health/ready", port, Path(tmp) / "swap.log", env) as (base, _, _):
            chat = {"model": "m", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]}
            for i in range(runs):
                for target in (folder, gguf):
                    start = time.perf_counter()
                    answer = post(base, "/admin/model", {"model": target}, ADMIN)
                    wall = time.perf_counter() - start
                    text = post(base, "/v1/chat/completions", chat)["choices"][0]["message"]["content"]
                    swaps.append({"to": "mlx-lm folder" if target == folder else "gguf", "wall_s": wall,
                                  "server_s": answer["seconds"], "model": models(base), "answer": text})
                    print(f"  swap {i} to {swaps[-1]['to']}: {wall:.2f} s; answers {text!r}", flush=True)
    summary = {"median_swap_s": statistics.median(s["wall_s"] for s in swaps),
               "max_swap_s": max(s["wall_s"] for s in swaps), "swaps": len(swaps)}
    report = {"benchmark": "swap", "machine": machine_info(), "summary": summary, "swaps": swaps}
    out.write_text(json.dumps(report, indent=2))
    return report
