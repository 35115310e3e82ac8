"""Model hot swap (POST /admin/model) stays consistent whatever its client does and whatever is being
tokenized meanwhile: the prompt renderer's tokenizer, the engine's model and the cache's fingerprint
always name one model, and every prompt runs on the model whose tokenizer made its ids."""

from __future__ import annotations

import asyncio
import threading

import mlx.core as mx
import numpy as np

from semcache.cache import entryfile as store
from semcache.engine.engine import MLXEngine
from semcache.engine.models import load_model
from semcache.http.appkeys import SERVICE
from semcache.text.chat import PromptRenderer
from tests.conftest import FakeEngine, until
from tests.test_models import mlx_lm_folder

ANTHROPIC = {"anthropic-version": "2023-06-01"}
ADMIN = {"x-api-key": "adm"}
MSG = {"model": "m", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "Hi there"}]}


class GatedLoader:
    """load_model, except that loading `gated` waits until `release` (the test's "mid-load")."""

    def __init__(self, gated: str):
        self.gated = gated
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, spec):
        if spec == self.gated:
            self.entered.set()
            assert self.release.wait(30)
        return load_model(spec)


def on_disk(tmp_path) -> set[str]:
    """The fingerprints of the cache files written so far."""
    return {store.read_meta(p).meta.fingerprint for p in (tmp_path / "cache" / "entries").glob("*.safetensors")}


def logits(engine: MLXEngine, model=None):
    """Last-position logits of a fixed prompt, computed on the engine's MLX thread."""
    run = lambda: np.array((model or engine.model)(mx.array([[1, 2, 3, 4, 5]]))[0, -1])  # noqa: E731
    return engine._executor.submit(run).result()


class TestCancelledSwap:
    async def test_a_client_that_gives_up_mid_load_leaves_one_model_everywhere(self, make_client, tokenizer,
                                                                                 tmp_path):
        """Two tiny random llamas saved as mlx-lm folders. The admin client cancels POST /admin/model
        while the second one loads; the swap still finishes as one: afterwards the renderer's
        tokenizer is the engine's, the engine runs the second folder's weights, and the cache serves
        and writes under the second model's fingerprint."""
        first, second = tmp_path / "first", tmp_path / "second"
        mlx_lm_folder(first, tokenizer, seed=0)
        second_model = mlx_lm_folder(second, tokenizer, seed=1)
        loader = GatedLoader(str(second))
        engine = MLXEngine(str(first), loader=loader)
        client = await make_client(engine, admin_key="adm", cache_min_prefix=4)
        service = client.app[SERVICE]
        agent = {**ANTHROPIC, "X-Agent-ID": "a"}
        assert (await client.post("/v1/messages", json=MSG, headers=agent)).status == 200
        assert service.renderer.tokenizer is engine.tokenizer  # built for the first model
        old = engine.info.fingerprint
        await until(lambda: on_disk(tmp_path) == {old})
        swap = asyncio.create_task(client.post("/admin/model", json={"model": str(second)}, headers=ADMIN))
        assert await asyncio.to_thread(loader.entered.wait, 10)
        swap.cancel()  # the admin client times out: its connection closes, the handler is cancelled
        await asyncio.gather(swap, return_exceptions=True)
        await asyncio.sleep(0.1)  # the server sees the disconnect
        loader.release.set()
        await until(lambda: engine.info.path == str(second))
        r = await client.post("/v1/messages", json=MSG, headers=agent)  # after the swap, on its model
        assert r.status == 200
        assert service.renderer.tokenizer is engine.tokenizer
        assert service.cache.disk.fingerprint == engine.info.fingerprint
        assert service.cache.disk.fingerprint == load_model(str(second)).info.fingerprint
        np.testing.assert_allclose(logits(engine), logits(engine, second_model), atol=1e-5)
        metrics = await (await client.get("/metrics")).text()
        line = next(x for x in metrics.splitlines() if x.startswith("semcache_model_load_seconds "))
        assert float(line.split()[1]) == engine.load_seconds  # the second model's, its client gone or not
        # The first answer's file stays under the first model; the second's is under the second.
        await asyncio.wait_for(until(lambda: len(on_disk(tmp_path)) > 1), 5)
        assert on_disk(tmp_path) == {old, engine.info.fingerprint}


class TestSwapDuringTokenization:
    async def test_a_prompt_tokenized_across_a_swap_runs_with_its_tokenizers_fingerprint(self, make_client,
                                                                                      tokenizer, monkeypatch):
        """A prompt still being rendered when a swap starts and ends is never tagged with the new
        model's fingerprint while holding the old tokenizer's ids: the fingerprint it is queued
        with is that of the model whose renderer made its ids, and it is answered."""
        client = await make_client(FakeEngine(tokenizer), admin_key="adm")
        service = client.app[SERVICE]
        entered, release = threading.Event(), threading.Event()
        used: list[PromptRenderer] = []
        render = PromptRenderer.render

        def slow_render(self, *args, **kwargs):
            used.append(self)
            if len(used) == 1:  # the first prompt stays in tokenization until the swap is over
                entered.set()
                assert release.wait(10)
            return render(self, *args, **kwargs)

        monkeypatch.setattr(PromptRenderer, "render", slow_render)
        fingerprints = {id(service.renderer): service.info.fingerprint}
        queued: list[tuple[PromptRenderer, str]] = []
        submit = service.scheduler.submit

        def recording_submit(seq):
            queued.append((used[-1], seq.fingerprint))
            submit(seq)

        monkeypatch.setattr(service.scheduler, "submit", recording_submit)
        answer = asyncio.create_task(client.post("/v1/messages", json=MSG, headers=ANTHROPIC))
        assert await asyncio.to_thread(entered.wait, 10)
        r = await client.post("/admin/model", json={"model": "m2"}, headers=ADMIN)
        assert r.status == 200 and (await r.json())["fingerprint"] == "fp-m2"
        fingerprints[id(service.renderer)] = "fp-m2"
        release.set()
        assert (await answer).status == 200
        assert queued and all(fingerprints[id(renderer)] == fp for renderer, fp in queued), queued


class SlowLoad(FakeEngine):
    """A fake engine whose next model takes as long as the test wants to load."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.loading = asyncio.Event()

    async def prepare(self, spec):
        self.loading.set()
        await asyncio.sleep(60)
        return await super().prepare(spec)


class TestShutdownDuringSwap:
    async def test_a_swap_still_loading_at_shutdown_is_undone(self, make_client, tokenizer):
        """The service closing while a swap loads its model stops the swap there: the model in
        place, the cache's fingerprint and admissions stay as they were; its client gets a 503
        that says the model was not swapped."""
        engine = SlowLoad(tokenizer)
        client = await make_client(engine, admin_key="adm")
        service = client.app[SERVICE]
        before = (engine.info, service.cache.disk.fingerprint)
        swap = asyncio.create_task(client.post("/admin/model", json={"model": "m2"}, headers=ADMIN))
        await asyncio.wait_for(engine.loading.wait(), 5)
        await asyncio.wait_for(service.models.end(), 5)
        assert (engine.info, service.cache.disk.fingerprint) == before and not service.scheduler.paused
        r = await swap
        assert r.status == 503 and "not swapped" in (await r.json())["error"]["message"]
        assert (await client.post("/v1/messages", json=MSG, headers=ANTHROPIC)).status == 200
