"""Faults, end to end on a fake engine: damaged cache files, failing disk I/O, a model that cannot load.

The fake engine's "KV" is the token ids themselves and it records every admission whose cached prefix
is not the start of its own prompt (`prefix_errors`), so a damaged entry that got served would fail
these tests. Each agent has its own system prompt: a lost entry cannot be replaced by another agent's.
Unit-level cases live in test_store.py (parsing, hash) and test_kvcache.py (quarantine on load/open);
SIGKILL during writes in test_restart.py (real model).
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import errno
import io
import json
import os
import struct
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from semcache.cache import entryfile as store
from semcache.http.appkeys import SERVICE
from tests.conftest import FAKE_REPLY, free_port

CACHE = {"cache_min_prefix": 16}
QUESTION, FOLLOW_UP = "What should I do first?", "And then?"


def system(agent: str) -> str:
    """~60 tokens that differ from another agent's within the first few tokens."""
    return f"{agent.capitalize()} is the name of this assistant. " + f"{agent} answers briefly. " * 8


def turn(n: int) -> list[str]:
    """The user/assistant texts of turn n (1-based): each turn repeats the previous ones."""
    texts = [QUESTION]
    for _ in range(n - 1):
        texts += [FAKE_REPLY, FOLLOW_UP]
    return texts


async def chat(client, agent: str, n: int) -> dict:
    """Agent's turn n (OpenAI dialect); asserts a 200 with the right answer, returns the body."""
    roles = ["user", "assistant"]
    messages = [{"role": "system", "content": system(agent)}]
    messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(turn(n))]
    r = await client.post("/v1/chat/completions", headers={"X-Agent-ID": agent},
                          json={"model": "m", "messages": messages, "max_tokens": 32})
    assert r.status == 200, f"{agent} turn {n}: {r.status} {await r.text()}"
    body = await r.json()
    assert body["choices"][0]["message"]["content"] == FAKE_REPLY
    return body


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


async def metric(client, name: str, **labels: str) -> float:
    """A sample scraped from /metrics (0 if absent)."""
    text = await (await client.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def served_wrongly(client) -> list[int]:
    return client.app[SERVICE].engine.prefix_errors


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


async def entry_file(client, cache_dir: Path, agent: str) -> Path:
    """The agent's one entry file, written and settled."""
    await client.app[SERVICE].cache.settle()
    entries = (await (await client.get(f"/v1/agents/{agent}")).json())["entries"]
    assert len(entries) == 1, entries
    path = cache_dir / "entries" / f"{entries[0]['entry_id']}{store.SUFFIX}"
    assert path.exists()
    return path


# Damaging a file ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Layout:
    """Where the parts of an entry file are: header JSON, then each tensor's bytes."""

    header: bytes
    data_start: int
    tensors: dict[str, tuple[int, int]]  # name -> absolute (begin, end)

    @classmethod
    def of(cls, path: Path) -> Layout:
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = raw[8:8 + length]
        spans = {name: (8 + length + spec["data_offsets"][0], 8 + length + spec["data_offsets"][1])
                 for name, spec in json.loads(header).items() if name != "__metadata__"}
        return cls(header, 8 + length, spans)


def cut(path: Path, size: int) -> None:
    os.truncate(path, size)


def flip(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _in_header(layout: Layout, text: bytes, after: int = 0) -> int:
    return 8 + layout.header.index(text) + after


# name -> (damage, found by the header alone at start-up?)
DAMAGES = {
    "cut-in-length": (lambda p, l: cut(p, 4), True),
    "cut-in-metadata": (lambda p, l: cut(p, _in_header(l, b'"fingerprint"')), True),
    "cut-in-tensor-table": (lambda p, l: cut(p, _in_header(l, b'"layers.0.keys"', 5)), True),
    "cut-in-token-ids": (lambda p, l: cut(p, l.tensors["tokens"][1] - 2), True),
    "cut-in-kv-data": (lambda p, l: cut(p, sum(l.tensors["layers.0.keys"]) // 2), True),
    "cut-last-byte": (lambda p, l: cut(p, p.stat().st_size - 1), True),
    "zero-length": (lambda p, l: cut(p, 0), True),
    "flip-header-json": (lambda p, l: flip(p, 8), True),  # "{" becomes "z": not JSON
    "flip-header-value": (lambda p, l: flip(p, _in_header(l, b'"created":"', 11)), False),  # a digit: still JSON
    "flip-last-token-id": (lambda p, l: flip(p, l.tensors["tokens"][1] - 4), False),
    "flip-keys": (lambda p, l: flip(p, l.tensors["layers.0.keys"][1] - 2, 6), False),
    "flip-values": (lambda p, l: flip(p, l.tensors["layers.0.values"][1] - 1, 7), False),
}
HEALTHY = ["healthy-one", "healthy-two"]
FOREIGN = "foreign"  # its file is rewritten as another model's


def agent_of(damage: str) -> str:
    return "agent-" + damage


def as_other_model(path: Path) -> Path:
    """Rewrite an entry as another model's file (new key, same agent and tokens); remove the original."""
    meta, tensors = store.read(path)
    other = dataclasses.replace(meta, key="f" * 16, fingerprint="another-model-fingerprint")
    stored = store.write(path.parent.parent, other, tensors)
    path.unlink()
    return stored.path


class TestDamagedFilesAtRestart:
    async def test_damaged_files_are_quarantined_and_missed_the_rest_served(self, make_client, tmp_path):
        """Entries written by one app, then cut, bit-flipped, emptied or re-labelled as another model's:
        a new app quarantines and counts every damaged file (those whose header shows it at start, the
        rest when loaded), answers their agents cold and correctly, still serves the healthy agents,
        and never serves nor quarantines the other model's file."""
        cache_dir = tmp_path / "cache"
        client = await make_client(**CACHE)
        agents = [agent_of(d) for d in DAMAGES] + HEALTHY + [FOREIGN]
        for agent in agents:
            assert cached(await chat(client, agent, 1)) == 0
        files = {agent: await entry_file(client, cache_dir, agent) for agent in agents}
        await client.close()  # the cache is on disk

        for damage, (hurt, _) in DAMAGES.items():
            path = files[agent_of(damage)]
            hurt(path, Layout.of(path))
        foreign = as_other_model(files[FOREIGN])

        client = await make_client(**CACHE)
        at_start = {d for d, (_, by_header) in DAMAGES.items() if by_header}
        assert names(cache_dir / "quarantine") == {files[agent_of(d)].name for d in at_start}
        assert await metric(client, "semcache_cache_quarantined_total") == len(at_start)
        listed = {e["agent_id"] for e in (await (await client.get("/v1/agents")).json())["data"]}
        assert listed == set(HEALTHY) | {agent_of(d) for d in DAMAGES.keys() - at_start}

        for agent in agents:
            body = await chat(client, agent, 2)
            if agent in HEALTHY:
                assert cached(body) > 0, f"{agent}: healthy entry not served"
            else:
                assert cached(body) == 0, f"{agent}: a damaged or foreign entry was served: {body['usage']}"
        assert served_wrongly(client) == []
        await client.app[SERVICE].cache.settle()
        assert names(cache_dir / "quarantine") == {files[agent_of(d)].name for d in DAMAGES}
        assert await metric(client, "semcache_cache_quarantined_total") == len(DAMAGES)
        assert foreign.exists(), "the other model's file was deleted or quarantined"
        assert await metric(client, "semcache_cache_disk_errors_total", op="read", errno="EIO") == 0


class TestDamagedWhileRunning:
    @pytest.mark.parametrize("damage", ["cut-in-kv-data", "flip-keys", "zero-length", "deleted"])
    async def test_file_damaged_after_eviction_is_a_miss_at_load(self, make_client, tmp_path, damage):
        """An entry evicted to disk and then damaged behind the daemon's back (the index was built
        from the good file) is found out when loaded: a miss with the right answer, quarantined and
        counted (a deleted file: dropped and counted as a read error); the agent's next turn hits."""
        cache_dir = tmp_path / "cache"
        client = await make_client(**CACHE)
        await chat(client, "victim", 1)
        assert (await client.post("/v1/agents/victim/evict")).status == 200
        path = await entry_file(client, cache_dir, "victim")
        if damage == "deleted":
            path.unlink()
        else:
            DAMAGES[damage][0](path, Layout.of(path))

        assert cached(await chat(client, "victim", 2)) == 0
        assert served_wrongly(client) == []
        await client.app[SERVICE].cache.settle()
        quarantined = 0 if damage == "deleted" else 1
        assert names(cache_dir / "quarantine") == ({path.name} if quarantined else set())
        assert await metric(client, "semcache_cache_quarantined_total") == quarantined
        assert await metric(client, "semcache_cache_disk_errors_total", op="read", errno="ENOENT") == 1 - quarantined
        assert await metric(client, "semcache_cache_lookups_total", result="miss") == 2
        assert cached(await chat(client, "victim", 3)) > 0  # turn 2's new entry


# Injected I/O errors ------------------------------------------------------------------------------


class DiskFaults:
    """Makes the agent cache's file I/O fail as a full or failing disk does. Tests run as root, so
    file modes would not stop a write: the OS calls entryfile.py makes are patched instead, failing only
    on the cache's I/O thread and only for files under entries/. `attempts` counts calls that failed.

    Points: create (the temp file), write (half of the data lands, then the error), fsync (the file),
    dir-fsync (the folder, after the rename), open-read (opening an entry to read), read (reading it)."""

    def __init__(self, monkeypatch):
        self.failing: dict[str, int] = {}
        self.only: str | None = None  # fail only paths containing this
        self.attempts: Counter[str] = Counter()
        self._dir_fds: set[int] = set()
        real_open, real_fdopen, real_fsync = os.open, os.fdopen, os.fsync
        faults = self

        def fake_os_open(path, flags, mode=0o777, *args, **kwargs):
            if faults._hit("create", path) and flags & os.O_CREAT:
                faults._raise("create")
            fd = real_open(path, flags, mode, *args, **kwargs)
            if faults._on_io_thread() and os.path.isdir(path):
                faults._dir_fds.add(fd)
            return fd

        def fake_fsync(fd):
            point = "dir-fsync" if fd in faults._dir_fds else "fsync"
            faults._dir_fds.discard(fd)
            if faults._on_io_thread() and point in faults.failing:
                faults._raise(point)
            return real_fsync(fd)

        def fake_fdopen(fd, *args, **kwargs):
            return _FailingWriter(fd, faults) if faults._hit("write", "entries") else real_fdopen(fd, *args, **kwargs)

        def fake_open(path, mode="r", *args, **kwargs):
            if faults._hit("open-read", path):
                faults._raise("open-read")
            if faults._hit("read", path):
                return _FailingReader(path, faults)
            return builtins.open(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "fsync", fake_fsync)
        monkeypatch.setattr(os, "fdopen", fake_fdopen)
        monkeypatch.setattr(store, "open", fake_open, raising=False)

    def fail(self, point: str, code: int, only: str | None = None) -> None:
        self.failing[point] = code
        self.only = only

    def clear(self) -> None:
        self.failing.clear()

    @staticmethod
    def _on_io_thread() -> bool:
        return threading.current_thread().name.startswith("semcache-io")

    def _hit(self, point: str, path) -> bool:
        return (point in self.failing and self._on_io_thread() and "entries" in str(path)
                and (self.only is None or self.only in str(path)))

    def _raise(self, point: str):
        self.attempts[point] += 1
        code = self.failing[point]
        raise OSError(code, os.strerror(code))


class _FailingWriter(io.BufferedWriter):
    """A file whose third write (the first KV bytes, after length and header) writes half, then fails."""

    def __init__(self, fd: int, faults: DiskFaults):
        super().__init__(io.FileIO(fd, "wb"))
        self._faults, self._writes = faults, 0

    def write(self, data) -> int:
        self._writes += 1
        if self._writes >= 3:
            super().write(memoryview(data)[: len(data) // 2])
            self.flush()
            self._faults._raise("write")
        return super().write(data)


class _FailingReader(io.FileIO):
    def __init__(self, path, faults: DiskFaults):
        super().__init__(path, "rb")
        self._faults = faults

    def read(self, *args):
        self._faults._raise("read")

    readinto = read


@pytest.fixture
def faults(monkeypatch):
    return DiskFaults(monkeypatch)


def disk_state(cache_dir: Path) -> tuple[set[str], set[str]]:
    """(entry files, temp files) in entries/."""
    found = names(cache_dir / "entries")
    return {n for n in found if n.endswith(store.SUFFIX)}, {n for n in found if n.endswith(".tmp")}


class TestWriteErrors:
    @pytest.mark.parametrize("point,code", [("create", errno.ENOSPC), ("write", errno.ENOSPC),
                                            ("fsync", errno.EIO), ("dir-fsync", errno.EIO)])
    async def test_failed_write_leaves_no_file_pauses_writes_then_recovers(self, make_client, tmp_path, faults,
                                                                          point, code):
        """A write that fails (disk full, I/O error) at any step leaves neither a file nor a temp file;
        the request succeeds and the entry serves from memory; the error is counted by errno; writes
        then pause (no attempt per request) and, once the fault is gone and the pause over, the
        skipped entries are written and read back."""
        cache_dir, label = tmp_path / "cache", errno.errorcode[code]
        client = await make_client(**CACHE)
        cache = client.app[SERVICE].cache
        cache.write_pause = 0.3
        faults.fail(point, code)
        await chat(client, "first", 1)
        await cache.settle()
        assert disk_state(cache_dir) == (set(), set())
        assert faults.attempts[point] == 1
        assert await metric(client, "semcache_cache_disk_errors_total", op="write", errno=label) == 1
        assert cached(await chat(client, "first", 2)) > 0  # from memory
        await chat(client, "second", 1)
        await cache.settle()
        assert faults.attempts[point] == 1, "writes were retried during the pause"

        faults.clear()
        await asyncio.sleep(cache.write_pause)
        await chat(client, "third", 1)
        await cache.settle()
        files, temps = disk_state(cache_dir)
        assert len(files) == 3 and not temps, (files, temps)  # first (turn 2), second, third
        assert await metric(client, "semcache_cache_disk_errors_total", op="write", errno=label) == 1
        assert (await client.post("/v1/agents/first/evict")).status == 200
        assert cached(await chat(client, "first", 3)) > 0
        assert await metric(client, "semcache_cache_lookups_total", result="disk_hit") == 1
        assert served_wrongly(client) == []

    async def test_spills_during_a_write_pause_are_dropped_not_retried(self, make_client, tmp_path, faults):
        """With no memory budget every entry spills to disk at once: on a full disk the first write
        fails and the next spills are dropped without a write attempt; their agents' turns run cold,
        correctly, and nothing is left in the writing tier."""
        client = await make_client(cache_memory_budget=0, **CACHE)
        cache = client.app[SERVICE].cache
        faults.fail("write", errno.ENOSPC)
        for agent in ("one", "two", "three"):
            await chat(client, agent, 1)
        await cache.settle()
        assert faults.attempts["write"] == 1
        assert cache.entries == {} and cache.writing_bytes == 0
        assert disk_state(tmp_path / "cache") == (set(), set())
        assert cached(await chat(client, "two", 2)) == 0
        assert served_wrongly(client) == []
        cache.check_integrity()


class TestReadErrors:
    @pytest.mark.parametrize("point", ["open-read", "read"])
    async def test_read_error_is_a_counted_miss_and_the_file_stays(self, make_client, tmp_path, faults, point):
        """EIO reading an entry on disk: the turn runs cold with the right answer after one read
        attempt (no retry loop), the error is counted, nothing is quarantined; once the fault is gone
        other entries load from disk again."""
        cache_dir = tmp_path / "cache"
        client = await make_client(**CACHE)
        for agent in ("unlucky", "lucky"):
            await chat(client, agent, 1)
            assert (await client.post(f"/v1/agents/{agent}/evict")).status == 200
        faults.fail(point, errno.EIO)
        assert cached(await chat(client, "unlucky", 2)) == 0
        assert faults.attempts[point] == 1
        assert await metric(client, "semcache_cache_disk_errors_total", op="read", errno="EIO") == 1
        assert await metric(client, "semcache_cache_quarantined_total") == 0
        assert names(cache_dir / "quarantine") == set()

        faults.clear()
        assert cached(await chat(client, "lucky", 2)) > 0
        assert await metric(client, "semcache_cache_lookups_total", result="disk_hit") == 1
        assert served_wrongly(client) == []
        client.app[SERVICE].cache.check_integrity()

    async def test_unreadable_file_at_start_is_skipped_then_indexed_at_the_next_start(self, make_client, tmp_path,
                                                                                       faults):
        """A file that cannot be read while the index is built is left alone (not quarantined, not
        indexed, counted); the other files are indexed; the next start indexes and serves it."""
        cache_dir = tmp_path / "cache"
        client = await make_client(**CACHE)
        for agent in ("shy", "bold"):
            await chat(client, agent, 1)
        shy = await entry_file(client, cache_dir, "shy")
        await client.close()

        faults.fail("open-read", errno.EIO, only=shy.name)
        client = await make_client(**CACHE)
        listed = [e["agent_id"] for e in (await (await client.get("/v1/agents")).json())["data"]]
        assert listed == ["bold"]
        assert await metric(client, "semcache_cache_disk_errors_total", op="read", errno="EIO") == 1
        assert shy.exists() and names(cache_dir / "quarantine") == set()
        await client.close()

        faults.clear()
        client = await make_client(**CACHE)
        assert cached(await chat(client, "shy", 2)) > 0
        assert served_wrongly(client) == []


# The model missing or corrupt at start ----------------------------------------------------------------


def _gguf_cut(fraction: float):
    def make(tmp_path: Path) -> Path:
        from semcache.engine.models import embedded_model_path

        data = embedded_model_path().read_bytes()
        path = tmp_path / "cut.gguf"
        path.write_bytes(data[: int(len(data) * fraction)])
        return path
    return make


def _file(name: str, content: bytes):
    def make(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path
    return make


def _folder(damage):
    """A tiny but complete mlx-lm folder (test_models.py loads the same successfully), then damaged."""
    def make(tmp_path: Path) -> Path:
        import mlx.core as mx
        import mlx.nn as nn

        from semcache.engine.models import embedded_model_path, load_gguf_tokenizer
        from tests.test_engine import tiny_model

        folder = tmp_path / "tiny-llama"
        folder.mkdir()
        model = tiny_model()
        mx.save_safetensors(str(folder / "model.safetensors"), dict(nn.utils.tree_flatten(model.parameters())))
        (folder / "config.json").write_text(json.dumps({k: v for k, v in vars(model.args).items() if v is not None}))
        load_gguf_tokenizer(embedded_model_path()).save_pretrained(str(folder))
        return damage(folder)
    return make


def _weights(action):
    def damage(folder: Path) -> Path:
        weights = folder / "model.safetensors"
        action(weights)
        return weights
    return damage


def _config(text: str | None):
    def damage(folder: Path) -> Path:
        config = folder / "config.json"
        config.unlink() if text is None else config.write_text(text)
        return config
    return damage


# name -> (make the model, return the path the error must name). test_models.py covers a missing
# .gguf and a short non-GGUF file.
BROKEN_MODELS = {
    "gguf-zero-length": _file("empty.gguf", b""),
    "gguf-random-bytes": _file("random.gguf", os.urandom(1 << 16)),
    "gguf-cut-in-metadata": _gguf_cut(0.001),
    "gguf-cut-in-tensors": _gguf_cut(0.5),
    "gguf-last-bytes-missing": _gguf_cut(0.9999),
    "folder-missing": lambda tmp_path: tmp_path / "no-such-model",
    "folder-without-weights": _folder(_weights(Path.unlink)),
    "folder-weights-zero-length": _folder(_weights(lambda p: os.truncate(p, 0))),
    "folder-weights-cut": _folder(_weights(lambda p: os.truncate(p, p.stat().st_size // 2))),
    "folder-weights-random": _folder(_weights(lambda p: p.write_bytes(os.urandom(1 << 16)))),
    "folder-config-missing": _folder(_config(None)),
    "folder-config-not-json": _folder(_config("{not json")),
    "folder-config-no-model-type": _folder(_config("{}")),
}
MODEL_EXIT_TIMEOUT = 60


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BROKEN_MODELS))
def test_broken_model_exits_nonzero_with_one_clear_error(tmp_path, case):
    """`semcache serve` on a missing or corrupt model exits 1 within the timeout (never hangs), with
    exactly one error line on stderr that names the file, and no traceback."""
    named = BROKEN_MODELS[case](tmp_path)
    model = named if not named.name.endswith(".json") and named.suffix != ".safetensors" else named.parent
    proc = subprocess.run(
        [sys.executable, "-m", "semcache", "serve", "--model", str(model), "--port", str(free_port()),
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=MODEL_EXIT_TIMEOUT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [json.loads(line)["msg"] for line in proc.stderr.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    want = named if case != "folder-without-weights" else model
    assert str(want) in errors[0], f"the error does not name {want}: {errors[0]}"
