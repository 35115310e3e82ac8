"""The entry file format (entryfile.py) and the KV encodings written in it (kvdata.py)."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import stat
import struct

import numpy as np
import pytest

from semcache.cache import cachedir
from semcache.cache import entryfile as store
from semcache.cache.kvdata import GROUP, KVData
from semcache.cache.cachedir import CacheDirLocked
from semcache.cache.entryfile import CorruptEntry, EntryMeta
from tests.conftest import rewrite_header


def meta(key: str = "k0", num_tokens: int = 5, **overrides) -> EntryMeta:
    fields = dict(key=key, fingerprint="fp-A", tenant="t-hash", agent="agent-1", named=True,
                  num_tokens=num_tokens, dtype="float32", encoding="native", created=1000.25, last_use=2000.5)
    fields.update(overrides)
    return EntryMeta(**fields)


def tensors(num_tokens: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": np.arange(100, 100 + num_tokens, dtype=np.int32),
        "layers.0.keys": rng.standard_normal((1, 2, num_tokens, 4)).astype(np.float32),
        "layers.0.values": rng.standard_normal((1, 2, num_tokens, 4)).astype(np.float32),
        "layers.1.keys": rng.integers(0, 1 << 16, (1, 2, num_tokens, 4)).astype(np.uint16),
        "layers.1.values": rng.integers(0, 1 << 16, (1, 2, num_tokens, 4)).astype(np.uint16),
    }


@pytest.fixture
def cache_dir(tmp_path):
    """A locked cache directory (entries/ and quarantine/ exist); the lock is released after the test."""
    directory = tmp_path / "cache"
    handle = cachedir.lock_dir(directory)
    yield directory
    handle.close()


def data_start(path) -> int:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return 8 + length


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


class TestStore:
    def test_write_read_round_trip(self, cache_dir):
        """write then read returns the same arrays (dtype, shape, bytes), tokens and metadata."""
        m, arrays = meta(), tensors()
        stored = store.write(cache_dir, m, arrays)
        assert stored.path == store.entry_path(cache_dir, "k0")
        assert stored.size == stored.path.stat().st_size
        got_meta, got = store.read(stored.path)
        assert got_meta == m
        assert list(got) == list(arrays)
        for name, a in arrays.items():
            assert got[name].dtype == a.dtype and got[name].shape == a.shape
            np.testing.assert_array_equal(got[name], a)

    def test_round_trip_of_non_contiguous_arrays(self, cache_dir):
        """a strided view (a KVData prefix) is written as its logical contents."""
        full = np.arange(2 * 10 * 4, dtype=np.float32).reshape(1, 2, 10, 4)
        arrays = {"tokens": np.arange(6, dtype=np.int32), "layers.0.keys": full[:, :, :6, :]}
        stored = store.write(cache_dir, meta(num_tokens=6), arrays)
        _, got = store.read(stored.path)
        np.testing.assert_array_equal(got["layers.0.keys"], full[:, :, :6, :])

    def test_file_mode_is_0600(self, cache_dir):
        """an entry file is readable and writable by its owner only."""
        stored = store.write(cache_dir, meta(), tensors())
        assert stat.S_IMODE(stored.path.stat().st_mode) == 0o600

    def test_no_temp_file_left_after_write(self, cache_dir):
        """the temp file is renamed into place: only the entry file remains."""
        store.write(cache_dir, meta(), tensors())
        assert sorted(p.name for p in (cache_dir / "entries").iterdir()) == ["k0.safetensors"]

    def test_rewrite_replaces_the_file(self, cache_dir):
        """writing the same key again replaces the old contents."""
        store.write(cache_dir, meta(), tensors(seed=1))
        stored = store.write(cache_dir, meta(), tensors(seed=2))
        _, got = store.read(stored.path)
        np.testing.assert_array_equal(got["layers.0.keys"], tensors(seed=2)["layers.0.keys"])

    def test_read_meta_returns_tokens_and_meta_without_arrays(self, cache_dir, monkeypatch):
        """read_meta gives metadata, size and token ids, and reads no byte of the KV arrays."""
        stored = store.write(cache_dir, meta(), tensors())
        os.utime(stored.path, (1.0, 1.0))  # older than last_use: the metadata's last_use wins
        reads: list[int] = []

        class Counting:
            def __init__(self, f):
                self.f = f

            def read(self, n=-1):
                data = self.f.read(n)
                reads.append(len(data))
                return data

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        monkeypatch.setattr(store, "open", lambda *a, **k: Counting(open(*a, **k)), raising=False)
        got = store.read_meta(stored.path)
        monkeypatch.undo()
        assert got.meta == meta()
        assert got.size == stored.size
        np.testing.assert_array_equal(got.tokens, tensors()["tokens"])
        kv_bytes = sum(a.nbytes for n, a in tensors().items() if n != "tokens")
        assert sum(reads) == stored.size - kv_bytes  # length, header and token ids: nothing more

    def test_read_meta_refuses_a_file_cut_after_the_token_ids(self, cache_dir):
        """a file cut right after the token ids is caught from the header alone (at start, not at load)."""
        stored = store.write(cache_dir, meta(), tensors())
        raw = stored.path.read_bytes()
        stored.path.write_bytes(raw[: data_start(stored.path) + 4 * 5])
        with pytest.raises(CorruptEntry, match="data bytes"):
            store.read_meta(stored.path)
        with pytest.raises(CorruptEntry):
            store.read(stored.path)

    def test_read_meta_takes_the_newer_mtime_as_last_use(self, cache_dir):
        """a touch (mtime) newer than the metadata's last_use counts as the last use."""
        stored = store.write(cache_dir, meta(), tensors())
        store.touch(stored.path, 5000.0)
        assert store.read_meta(stored.path).meta.last_use == 5000.0

    def test_flipped_data_byte_fails_the_content_hash(self, cache_dir):
        """one flipped byte in the data region: read raises CorruptEntry (read_meta still parses)."""
        stored = store.write(cache_dir, meta(), tensors())
        flip_byte(stored.path, stored.size - 1)  # in the last tensor's data
        store.read_meta(stored.path)
        with pytest.raises(CorruptEntry, match="hash"):
            store.read(stored.path)

    def test_flipped_token_byte_fails_the_content_hash(self, cache_dir):
        """a flipped byte in the token ids is caught by read's hash too."""
        stored = store.write(cache_dir, meta(), tensors())
        flip_byte(stored.path, data_start(stored.path))  # tokens come first
        with pytest.raises(CorruptEntry, match="hash"):
            store.read(stored.path)

    def test_changed_metadata_fails_the_content_hash(self, cache_dir):
        """metadata edited in the header (same length, still JSON) is caught by the hash."""
        stored = store.write(cache_dir, meta(agent="agent-1"), tensors())
        raw = stored.path.read_bytes().replace(b'"agent-1"', b'"agent-2"')
        stored.path.write_bytes(raw)
        assert store.read_meta(stored.path).meta.agent == "agent-2"
        with pytest.raises(CorruptEntry, match="hash"):
            store.read(stored.path)

    @pytest.mark.parametrize("keep", [0, 5, 8, 40, "header", "data"])
    def test_truncated_file_is_corrupt(self, cache_dir, keep):
        """a file cut anywhere (inside the length, the header or the data) raises CorruptEntry."""
        stored = store.write(cache_dir, meta(), tensors())
        raw = stored.path.read_bytes()
        cut = {"header": data_start(stored.path) - 3, "data": len(raw) - 3}.get(keep, keep)
        stored.path.write_bytes(raw[:cut])
        with pytest.raises(CorruptEntry):
            store.read(stored.path)
        with pytest.raises(CorruptEntry):  # the header says how long the data is: caught at start
            store.read_meta(stored.path)

    @pytest.mark.parametrize("garbage", [
        b"", b"\x00", os.urandom(4096), struct.pack("<Q", 4) + b"[1,2" + b"\x00" * 64,
        struct.pack("<Q", 2) + b"{}" + b"\x00" * 8, struct.pack("<Q", 6) + b"\xff\xfe{}{}",
    ], ids=["empty", "one-byte", "random", "bad-json", "no-metadata", "not-utf8"])
    def test_garbage_file_is_corrupt(self, cache_dir, garbage):
        """a file that is not one of ours raises CorruptEntry from both read and read_meta."""
        path = store.entry_path(cache_dir, "junk")
        path.write_bytes(garbage)
        with pytest.raises(CorruptEntry):
            store.read(path)
        with pytest.raises(CorruptEntry):
            store.read_meta(path)

    def test_other_format_version_is_corrupt(self, cache_dir):
        """a file of another format version is refused."""
        stored = store.write(cache_dir, meta(), tensors())
        raw = stored.path.read_bytes().replace(b'"format":"1"', b'"format":"9"')
        stored.path.write_bytes(raw)
        with pytest.raises(CorruptEntry, match="format"):
            store.read(stored.path)
        with pytest.raises(CorruptEntry, match="format"):
            store.read_meta(stored.path)

    def test_scan_sorts_good_bad_and_deletes_temp_files(self, cache_dir):
        """scan returns the good files' metadata, lists the bad ones and deletes `.<key>.tmp` leftovers."""
        store.write(cache_dir, meta("a", 5), tensors(5))
        store.write(cache_dir, meta("b", 3), tensors(3))
        bad = store.entry_path(cache_dir, "bad")
        bad.write_bytes(b"not a safetensors file")
        tmp = cache_dir / "entries" / ".c.tmp"
        tmp.write_bytes(b"half written")
        other = cache_dir / "entries" / "notes.txt"
        other.write_text("ignored")
        good, bad_paths, failed = cachedir.scan(cache_dir)
        assert failed == []
        assert sorted(f.meta.key for f in good) == ["a", "b"]
        assert {f.meta.key: f.tokens.tolist() for f in good} == {"a": list(range(100, 105)),
                                                                  "b": list(range(100, 103))}
        assert bad_paths == [bad]
        assert not tmp.exists()
        assert other.exists() and bad.exists()

    def test_quarantine_moves_the_file(self, cache_dir):
        """quarantine moves a file to <dir>/quarantine/; a missing file is not an error."""
        stored = store.write(cache_dir, meta(), tensors())
        cachedir.quarantine(cache_dir, stored.path)
        assert not stored.path.exists()
        assert (cache_dir / "quarantine" / stored.path.name).exists()
        cachedir.quarantine(cache_dir, stored.path)

    def test_remove_and_touch_tolerate_missing_files(self, cache_dir):
        """remove and touch of a file that is gone do nothing."""
        path = store.entry_path(cache_dir, "gone")
        store.remove(path)
        store.touch(path, 1.0)
        assert not path.exists()

    def test_lock_dir_is_exclusive_until_closed(self, tmp_path):
        """a second lock_dir on the same directory raises CacheDirLocked until the first is closed."""
        directory = tmp_path / "locked"
        first = cachedir.lock_dir(directory)
        assert (directory / "entries").is_dir() and (directory / "quarantine").is_dir()
        assert (directory / "lock").read_text() == str(os.getpid())
        with pytest.raises(CacheDirLocked):
            cachedir.lock_dir(directory)
        with pytest.raises(CacheDirLocked):  # a failed attempt does not disturb the holder
            cachedir.lock_dir(directory)
        first.close()
        second = cachedir.lock_dir(directory)
        second.close()

    def test_lock_is_held_when_the_pid_cannot_be_written(self, tmp_path, monkeypatch):
        """a full disk (ENOSPC writing the pid into the lock file) does not keep the daemon from its
        folder: the lock is taken all the same, and still excludes a second daemon."""
        class Full:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(cachedir, "open", lambda *a, **k: Full(open(*a, **k)), raising=False)
        directory = tmp_path / "full"
        held = cachedir.lock_dir(directory)
        with pytest.raises(CacheDirLocked):
            cachedir.lock_dir(directory)
        held.close()

    def test_file_is_valid_safetensors(self, cache_dir):
        """any safetensors reader opens the file and sees the same tensors and metadata."""
        st_numpy = pytest.importorskip("safetensors.numpy")
        safe_open = pytest.importorskip("safetensors").safe_open
        arrays = tensors()
        stored = store.write(cache_dir, meta(), arrays)
        loaded = st_numpy.load_file(str(stored.path))
        assert set(loaded) == set(arrays)
        for name, a in arrays.items():
            assert loaded[name].dtype == a.dtype
            np.testing.assert_array_equal(loaded[name], a)
        with safe_open(str(stored.path), framework="numpy") as f:
            extra = f.metadata()
        assert extra["key"] == "k0" and extra["fingerprint"] == "fp-A" and extra["format"] == store.FORMAT_VERSION

    def test_header_is_8_byte_aligned_json(self, cache_dir):
        """the header length is a multiple of 8 and the header parses as JSON (safetensors layout)."""
        stored = store.write(cache_dir, meta(), tensors())
        start = data_start(stored.path)
        assert (start - 8) % 8 == 0
        header = json.loads(stored.path.read_bytes()[8:start])
        assert header["tokens"]["dtype"] == "I32" and header["layers.1.keys"]["dtype"] == "U16"


def kv(num_layers=2, heads=2, tokens=7, head_dim=64, dtype="float32", seed=0, scale=3.0) -> KVData:
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(num_layers):
        pair = []
        for _ in range(2):
            a = (rng.standard_normal((1, heads, tokens, head_dim)) * scale).astype(np.float32)
            if dtype == "bfloat16":
                a = (a.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bfloat16 bits
            else:
                a = a.astype(dtype)
            pair.append(a)
        layers.append(tuple(pair))
    return KVData(tuple(layers), dtype)


def as_float(a: np.ndarray, dtype: str) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else a.astype(np.float32)


def group_ranges(a: np.ndarray) -> np.ndarray:
    """max - min over each GROUP of the last axis, broadcast back to a's shape."""
    groups = a.reshape(*a.shape[:-1], a.shape[-1] // GROUP, GROUP)
    spread = groups.max(axis=-1, keepdims=True) - groups.min(axis=-1, keepdims=True)
    return np.broadcast_to(spread, groups.shape).reshape(a.shape)


class TestKVData:
    @pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
    def test_native_round_trip_is_bit_exact(self, cache_dir, dtype):
        """native encoding through a file returns the exact bits (bfloat16 stays uint16)."""
        data = kv(dtype=dtype)
        tokens = np.arange(data.num_tokens)
        stored = store.write(cache_dir, meta(num_tokens=7, dtype=dtype), data.to_tensors(tokens))
        m, arrays = store.read(stored.path)
        got_tokens, got = KVData.from_tensors(arrays, m.dtype, m.encoding)
        np.testing.assert_array_equal(got_tokens, tokens)
        assert got.dtype == dtype and len(got.layers) == 2
        for (k0, v0), (k1, v1) in zip(data.layers, got.layers):
            for a, b in ((k0, k1), (v0, v1)):
                assert b.dtype == a.dtype and b.shape == a.shape
                assert a.tobytes() == b.tobytes()

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    @pytest.mark.parametrize("encoding,bits", [("int8", 8), ("int4", 4)])
    def test_quantized_round_trip_within_half_a_step(self, cache_dir, dtype, encoding, bits):
        """int8/int4: |error| <= range/(2*(2^bits-1)) per group of 32 (half a quantization step),
        plus one bfloat16 rounding (2^-8 relative) when the model dtype is bfloat16."""
        data = kv(dtype=dtype, seed=3)
        tokens = np.arange(data.num_tokens)
        stored = store.write(cache_dir, meta(num_tokens=7, dtype=dtype, encoding=encoding),
                             data.to_tensors(tokens, encoding))
        m, arrays = store.read(stored.path)
        _, got = KVData.from_tensors(arrays, m.dtype, m.encoding)
        levels = (1 << bits) - 1
        for (k0, v0), (k1, v1) in zip(data.layers, got.layers):
            for a, b in ((k0, k1), (v0, v1)):
                assert b.dtype == a.dtype and b.shape == a.shape
                want, have = as_float(a, dtype), as_float(b, dtype)
                bound = group_ranges(want) / (2 * levels) * (1 + 1e-5) + 1e-6
                if dtype == "bfloat16":
                    bound = bound + np.abs(want) * 2.0 ** -8 + bound * 2.0 ** -8
                err = np.abs(have - want)
                assert (err <= bound).all(), f"max error {err.max()} over bound"
                assert err.max() > 0  # it really is lossy (guards against a silent native fallback)

    @pytest.mark.parametrize("encoding", ["int8", "int4"])
    def test_quantized_files_are_smaller(self, cache_dir, encoding):
        """int8 and int4 files are smaller than native, int4 smaller than int8."""
        data = kv(tokens=64)
        tokens = np.arange(64)
        sizes = {}
        for i, enc in enumerate(("native", "int8", "int4")):
            stored = store.write(cache_dir, meta(f"k{i}", num_tokens=64, encoding=enc), data.to_tensors(tokens, enc))
            sizes[enc] = stored.size
        assert sizes["int4"] < sizes["int8"] < sizes["native"]
        assert sizes[encoding] < sizes["native"] / 2

    def test_constant_group_is_exact(self):
        """a group whose values are all equal (range 0) comes back exactly."""
        a = np.full((1, 1, 3, 64), 1.5, dtype=np.float32)
        data = KVData(((a, a.copy()),), "float32")
        for enc in ("int8", "int4"):
            _, got = KVData.from_tensors(data.to_tensors(np.arange(3), enc), "float32", enc)
            np.testing.assert_array_equal(got.layers[0][0], a)

    def test_prefix_and_sizes(self):
        """prefix(n) keeps the first n tokens of every layer; num_tokens and nbytes follow."""
        data = kv(tokens=7)
        head = data.prefix(3)
        assert head.num_tokens == 3 and data.num_tokens == 7
        assert head.nbytes == data.nbytes * 3 // 7
        np.testing.assert_array_equal(head.layers[1][1], data.layers[1][1][:, :, :3, :])
        assert KVData((), "float32").num_tokens == 0


class TestMalformedHeaders:
    """Headers that parse as JSON but not as an entry: a bad file to quarantine, never a crash."""

    @pytest.mark.parametrize("field", ["num_tokens", "offsets"])
    def test_scan_lists_a_malformed_header_as_bad(self, cache_dir, field):
        """a parseable header with a null num_tokens or string data_offsets is a bad file, not a crash."""
        stored = store.write(cache_dir, meta(), tensors())

        def edit(header):
            if field == "num_tokens":
                header["__metadata__"]["num_tokens"] = None
            else:
                header["tokens"]["data_offsets"] = [str(x) for x in header["tokens"]["data_offsets"]]

        rewrite_header(stored.path, edit, reseal=False)
        good, bad, failed = cachedir.scan(cache_dir)
        assert good == [] and bad == [stored.path] and failed == []


class TestPlantedHeaders:
    """Files written by the writer, then planted or damaged (the hash resealed, so only the checks of
    the header can refuse them): CorruptEntry from read_meta and read, never another error or a hang."""

    @pytest.mark.parametrize("field,value", [
        ("key", 7), ("tenant", ["t-hash"]), ("agent", {"a": 1}), ("named", 1), ("named", "yes"),
        ("num_tokens", 5), ("num_tokens", "0"), ("num_tokens", "five"), ("created", 1000.25),
        ("last_use", "nan"), ("last_use", "inf"), ("dtype", None), ("dtype", "int32"), ("encoding", "zip"),
        ("fingerprint", True), ("format", 1),
    ])
    def test_a_header_field_of_the_wrong_type_or_range_is_corrupt(self, cache_dir, field, value):
        """every metadata value must be a string, and parse to a value in range."""
        stored = store.write(cache_dir, meta(), tensors())
        rewrite_header(stored.path, lambda h: h["__metadata__"].__setitem__(field, value))
        with pytest.raises(CorruptEntry):
            store.read_meta(stored.path)
        with pytest.raises(CorruptEntry):
            store.read(stored.path)

    def test_a_file_named_for_another_key_is_corrupt(self, cache_dir):
        """the key in the header must be the file's name (else a planted key names another file)."""
        stored = store.write(cache_dir, meta("k0"), tensors())
        moved = store.entry_path(cache_dir, "k1")
        os.replace(stored.path, moved)
        with pytest.raises(CorruptEntry, match="named"):
            store.read_meta(moved)

    @pytest.mark.parametrize("kind", ["fifo", "folder", "symlink"])
    def test_anything_but_a_regular_file_is_refused_at_once(self, cache_dir, tmp_path, kind):
        """a FIFO (whose open or read would block for ever), a folder or a symlink named as an entry:
        read_meta and read refuse it without blocking, and scan lists it to quarantine."""
        path = store.entry_path(cache_dir, "k0")
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "folder":
            path.mkdir()
        else:
            elsewhere = tmp_path / "elsewhere"
            (elsewhere / "entries").mkdir(parents=True)
            path.symlink_to(store.write(elsewhere, meta("k0"), tensors()).path)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a read that blocks fails the test, not hangs it
            try:
                for reader in (store.read_meta, store.read):
                    with pytest.raises(CorruptEntry, match="regular"):
                        pool.submit(reader, path).result(timeout=5)
                assert pool.submit(cachedir.scan, cache_dir).result(timeout=5) == ([], [path], [])
            finally:
                _unblock(path)

    def test_clamped_pulls_future_times_back_to_now(self, cache_dir):
        """a last use (or creation) in the future is clamped to now; past times are left alone."""
        stored = store.write(cache_dir, meta(created=1e12, last_use=1e12), tensors())
        got = store.read_meta(stored.path).clamped(5000.0)
        assert (got.meta.created, got.meta.last_use) == (5000.0, 5000.0)
        past = store.read_meta(stored.path).clamped(2e12)
        assert past.meta.last_use == 1e12


def _unblock(path) -> None:
    """Open a FIFO for writing, so a reader blocked on it (in a thread of an unfixed build) wakes."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass
