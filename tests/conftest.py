"""Shared fixtures: the real tokenizer, a fake engine that replays canned replies, live servers."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from aiohttp import web

from semcache.engine.types import Admission, ModelInfo, StepResult
from semcache.ops.config import Config
from semcache.cache.kvdata import KVData
from semcache.cache.layout import KVLayout

FAKE_REPLY = "The quick brown fox jumps over the lazy dog."
EOS = 2


@pytest.fixture(scope="session")
def tokenizer():
    from semcache.engine.models import embedded_model_path, load_gguf_tokenizer

    return load_gguf_tokenizer(embedded_model_path())


class FakeEngine:
    """Engine protocol without a model: each sequence replays `reply` then EOS, one token a step.

    Records every step's admissions and releases so tests can check what the scheduler did. Its
    "KV cache" holds each fed token id as the value, so a cache hit can be checked token by token:
    `prefix_errors` lists every admission whose cached prefix was not its own prompt's start.
    With `reject_prefixes`, it fails on every hit as a real engine does on a bad one: the step
    reports it rejected and the sequence runs from scratch.
    """

    def __init__(self, tokenizer, reply: str = FAKE_REPLY, step_delay: float = 0.0,
                 context_length: int = 8192, kv_bytes_per_token: int = 1000, load_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.reply_ids = tokenizer.encode(reply, add_special_tokens=False) + [EOS]
        self.step_delay = step_delay
        self.load_delay = load_delay
        self._info = ModelInfo("fake-model", context_length, frozenset({0, EOS}), kv_bytes_per_token,
                               kv_layout=FAKE_LAYOUT)
        self.info: ModelInfo | None = None
        self.active: dict[int, int] = {}  # seq_id -> tokens produced
        self.progress: dict[int, int] = {}  # seq_id -> tokens produced, kept across a preemption
        self._resumed: set[int] = set()  # re-admitted after a preemption: its last token is in its prompt
        self.fed: dict[int, list[int]] = {}  # seq_id -> token ids its KV covers
        self.hits: dict[int, int] = {}  # seq_id -> cached prefix length at admission
        self.prefix_errors: list[int] = []
        self.admitted: list[int] = []
        self.released: list[int] = []
        self.num_steps = 0
        self.fail_next_step = False
        self.reject_prefixes = False
        self.rejected: list[int] = []
        self.closed = False

    async def load(self) -> None:
        await asyncio.sleep(self.load_delay)
        self.info = self._info

    async def step(self, admit: list[Admission], release: list[int], keep=()) -> StepResult:
        self.num_steps += 1
        kept = {}
        for seq_id in release:
            self.active.pop(seq_id, None)
            fed = self.fed.pop(seq_id, [])
            if seq_id in keep:
                kept[seq_id] = fake_kv(fed)
            self.released.append(seq_id)
        for a in admit:
            self.active[a.seq_id] = self.progress.get(a.seq_id, 0)
            if self.active[a.seq_id]:
                self._resumed.add(a.seq_id)
            self.fed[a.seq_id] = list(a.prompt_ids)
            self.admitted.append(a.seq_id)
            if a.prefix is not None and self.reject_prefixes:
                self.rejected.append(a.seq_id)
            elif a.prefix is not None:
                self.hits[a.seq_id] = n = a.prefix.num_tokens
                if a.prefix.layers[0][0][0, 0, :, 0].astype(int).tolist() != list(a.prompt_ids[:n]):
                    self.prefix_errors.append(a.seq_id)
        await asyncio.sleep(self.step_delay)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected engine failure")
        out = {}
        for seq_id, produced in self.active.items():
            if produced and seq_id not in self._resumed:  # the previous token is fed to the model now
                self.fed[seq_id].append(self.reply_ids[min(produced - 1, len(self.reply_ids) - 1)])
            self._resumed.discard(seq_id)
            out[seq_id] = self.reply_ids[min(produced, len(self.reply_ids) - 1)]
            self.active[seq_id] = self.progress[seq_id] = produced + 1
        return StepResult(out, kept, frozenset(a.seq_id for a in admit if a.seq_id in self.rejected))

    async def prepare(self, spec: str) -> SimpleNamespace:
        """Another fake model: fails for "missing", else reports `spec` as its id and fingerprint."""
        from semcache.ops.errors import ModelLoadError

        await asyncio.sleep(0.01)
        if spec == "missing":
            raise ModelLoadError("no model at 'missing'")
        original = spec == self._info.model_id
        return SimpleNamespace(info=self._info if original else replace(self._info, model_id=spec,
                                                                         fingerprint="fp-" + spec))

    def install(self, prepared: SimpleNamespace) -> None:
        self.info = prepared.info

    async def close(self) -> None:
        self.closed = True


FAKE_LAYOUT = KVLayout(((1, 1, 1),), "float32")  # fake_kv's: one layer, one head, head dim 1



async def until(condition, timeout: float = 10.0) -> None:
    """Poll `condition` (every 5 ms) until it holds; fail after `timeout` seconds."""
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


async def settled(service) -> None:
    """Every turn's background work done (the reply comparison, then the prefill it may start) and
    every finished sequence's KV handed to the cache."""
    while service.turns.tasks:
        await asyncio.gather(*list(service.turns.tasks))
    await service.scheduler.wait_idle()

def fake_kv(token_ids: list[int]) -> KVData:
    """A one-layer KV whose values are the token ids themselves (for checking hits exactly)."""
    a = np.array(token_ids, dtype=np.float32).reshape(1, 1, len(token_ids), 1)
    return KVData(((a, a.copy()),), "float32")


def rewrite_header(path, edit, reseal: bool = True) -> None:
    """Rewrite an entry file's JSON header as `edit(header)` leaves it. With `reseal`, the content
    hash is recomputed: a planted file, which only the checks of its contents can refuse."""
    from semcache.cache import entryfile as store

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    edit(header)
    strings = header.get("__metadata__")
    if reseal and isinstance(strings, dict):
        table = {name: spec for name, spec in header.items() if name != "__metadata__"}
        views = [memoryview(data)[spec["data_offsets"][0] : spec["data_offsets"][1]] for spec in table.values()]
        strings["content_hash"] = store._hash(store._canonical(strings, table), views)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def count_tokenize(service) -> list:
    """Record every call of `service.tokenize` (rendering and tokenizing a prompt) in the list returned."""
    calls: list = []
    tokenize = service.tokenize

    async def counting(*args, **kwargs):
        calls.append(args)
        return await tokenize(*args, **kwargs)

    service.tokenize = counting
    return calls


@pytest.fixture
def fake_engine(tokenizer):
    return FakeEngine(tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(app: web.Application, timeout: float = 10.0) -> None:
    from semcache.http.appkeys import SERVICE

    service = app[SERVICE]
    for _ in range(int(timeout / 0.01)):
        if service.loaded:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the app did not become ready")


@contextmanager
def serve_in_thread(app: web.Application):
    """Run `app` on 127.0.0.1 in a background thread (for the sync SDK clients); yield its base URL."""
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner = web.AppRunner(app, handler_cancellation=True)

    async def start():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await wait_ready(app)
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(20), "server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture
def make_client(aiohttp_client, tokenizer, tmp_path):
    """Build an app on a FakeEngine with config overrides and return a ready test client."""
    from semcache.http.app import make_app

    async def factory(engine=None, clock=None, **overrides):
        engine = engine or FakeEngine(tokenizer)
        overrides.setdefault("cache_dir", str(tmp_path / "cache"))
        app = make_app(Config(**overrides), engine=engine, **({"clock": clock} if clock else {}))
        client = await aiohttp_client(app)
        await wait_ready(app)
        return client

    return factory


@pytest.fixture
def claude(base_url):
    """The anthropic SDK against the module's `base_url` fixture (a live server)."""
    import anthropic

    return anthropic.Anthropic(base_url=base_url, api_key="test", max_retries=0)


@pytest.fixture
def oai(base_url):
    """The openai SDK against the module's `base_url` fixture (a live server)."""
    import openai

    return openai.OpenAI(base_url=base_url + "/v1", api_key="test", max_retries=0)
