"""The entry file format: one safetensors file per agent cache entry. Synchronous (the disk tier
runs it on its I/O threads).

A file is a plain safetensors file (any safetensors reader opens it): the token ids, each layer's
keys and values, and string metadata (format version, model fingerprint, content hash, dtype,
token count, agent id, hashed tenant, last use). Files are written to a temp name, fsynced,
renamed and the folder fsynced, so a crash leaves either the old state or the whole new file.
The content hash (CRC-32 of metadata and data; measured at ~4 GB/s here, as fast as the read
itself) catches torn or corrupted files; a header is checked field by field (every value a string,
in range; the key is the file's name) and only regular files are opened, so a planted or damaged
file is refused (CorruptEntry: the caller quarantines it), never a crash or a hang.
The metadata's fields are entrymeta.py's; the directory (lock, listing, quarantine) cachedir.py's;
the KV's shapes against the model, layout.py's.
No MLX here: arrays are numpy, so this module can run on any thread.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from semcache.cache.entrymeta import CorruptEntry, EntryMeta, StoredFile

FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
ST_DTYPES = {"float32": "F32", "float16": "F16", "uint16": "U16", "uint8": "U8", "int32": "I32"}  # numpy name: safetensors
_NP_DTYPES = {v: np.dtype(k) for k, v in ST_DTYPES.items()}
_MAX_HEADER = 16 << 20


class NotSafetensors(CorruptEntry):
    """The header length is missing or larger than the file: not safetensors, or a file cut short."""


def entry_path(directory: Path, key: str) -> Path:
    return directory / "entries" / f"{key}{SUFFIX}"


def _hash(meta_json: bytes, views: list[memoryview]) -> str:
    crc = zlib.crc32(meta_json)
    for view in views:
        crc = zlib.crc32(view, crc)
    return f"{crc:08x}"


def write(directory: Path, meta: EntryMeta, tensors: dict[str, np.ndarray]) -> StoredFile:
    """Atomically write one entry (temp file, fsync, rename, fsync folder); mode 0600."""
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    views = [memoryview(a).cast("B") for a in arrays.values()]
    table: dict = {}
    offset = 0
    for (name, a), view in zip(arrays.items(), views):
        table[name] = {"dtype": ST_DTYPES[a.dtype.name], "shape": list(a.shape),
                       "data_offsets": [offset, offset + len(view)]}
        offset += len(view)
    strings = meta.to_strings()
    strings["format"] = FORMAT_VERSION
    strings["content_hash"] = _hash(_canonical(strings, table), views)
    encoded = json.dumps({"__metadata__": strings, **table}, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = entry_path(directory, meta.key)
    tmp = path.with_name(f".{meta.key}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for view in views:
                f.write(view)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    try:
        _fsync_dir(path.parent)
    except BaseException:  # the rename may not be durable: undo it, so the caller's "not written" holds
        unlink_quietly(path)
        raise
    return StoredFile(path, meta, 8 + len(encoded) + offset)


def unlink_quietly(path: Path) -> None:
    """Best-effort removal while another error is on its way up (which must not be masked)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _canonical(strings: dict[str, str], table: dict) -> bytes:
    """What the content hash covers besides the data: metadata and tensor table, key-sorted."""
    meta = {k: v for k, v in strings.items() if k != "content_hash"}
    return json.dumps([meta, table], sort_keys=True).encode()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(f: BinaryIO, size: int, limit: int = _MAX_HEADER) -> tuple[dict, int]:
    """A safetensors file's JSON header (at most `limit` bytes) and the offset where its data starts,
    read from the start of `f`, a file of `size` bytes; CorruptEntry if it does not parse or fit."""
    raw = f.read(8)
    if len(raw) < 8:
        raise NotSafetensors("file is shorter than a safetensors header")
    (length,) = struct.unpack("<Q", raw)
    if length > min(limit, size - 8):
        raise NotSafetensors(f"header length {length} does not fit the file")
    try:
        header = json.loads(f.read(length))
    except ValueError as exc:
        raise CorruptEntry(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptEntry("header is not a JSON object")
    return header, 8 + length


def data_end(header: dict) -> int:
    """Where the last tensor's bytes end (safetensors data is exactly that long); -1 if malformed."""
    try:
        return max((spec["data_offsets"][1] for name, spec in header.items() if name != "__metadata__"),
                   default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        return -1


def _read_entry_header(f: BinaryIO, size: int) -> tuple[dict, int]:
    """An entry file's header, with its metadata in this format's version."""
    header, start = read_header(f, size)
    strings = header.get("__metadata__")
    if not isinstance(strings, dict):
        raise CorruptEntry("header has no metadata")
    if strings.get("format") != FORMAT_VERSION:
        raise CorruptEntry(f"format version {strings.get('format')!r}, expected {FORMAT_VERSION}")
    return header, start


def _open_regular(path: Path, buffering: int = -1) -> tuple[BinaryIO, os.stat_result]:
    """An entry file opened for reading, and its stat; CorruptEntry if it is not a regular file (a
    FIFO would block the open or the read for ever; a link, a folder or a device is none of ours)."""
    try:
        f = open(path, "rb", buffering=buffering,
                 opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK | os.O_NOFOLLOW))
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV):
            raise CorruptEntry(f"not a regular file: {exc.strerror}") from None
        raise
    info = os.fstat(f.fileno())
    if not stat.S_ISREG(info.st_mode):
        f.close()
        raise CorruptEntry("not a regular file")
    return f, info


def read_meta(path: Path, check: Callable[[EntryMeta, dict], None] | None = None) -> StoredFile:
    """Metadata and token ids only (no KV arrays): how the index is rebuilt at start. `check(meta,
    header)` may refuse the file too (raising CorruptEntry), before its token ids are read."""
    f, info = _open_regular(path)
    size = info.st_size
    with f:
        header, start = _read_entry_header(f, size)
        meta = EntryMeta.from_strings(header["__metadata__"])
        if path.name != f"{meta.key}{SUFFIX}":  # else a planted key could name another file
            raise CorruptEntry(f"the file of entry {meta.key!r} is named {path.name!r}")
        if check is not None:
            check(meta, header)
        try:
            begin, end = header["tokens"]["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptEntry("no token ids") from None
        if not (isinstance(begin, int) and isinstance(end, int)):
            raise CorruptEntry("token offsets are not integers")
        if not 0 <= begin <= end <= size - start or end - begin != 4 * meta.num_tokens:
            raise CorruptEntry("token ids do not fit the file")
        if data_end(header) != size - start:  # a truncated (or padded) file: caught here, at start
            raise CorruptEntry(f"the tensors need {data_end(header)} data bytes, the file has {size - start}")
        f.seek(start + begin)
        tokens = np.frombuffer(f.read(end - begin), dtype=np.int32)
    if info.st_mtime > meta.last_use:
        meta = dataclasses.replace(meta, last_use=info.st_mtime)
    return StoredFile(path, meta, size, tokens)


def read(path: Path) -> tuple[EntryMeta, dict[str, np.ndarray]]:
    """Read a whole entry into memory and check its content hash; CorruptEntry if anything is off."""
    f, info = _open_regular(path, buffering=0)
    size = info.st_size
    with f:
        header, start = _read_entry_header(f, size)
        buffer = np.empty(size - start, dtype=np.uint8)
        if f.readinto(memoryview(buffer)) != len(buffer):
            raise CorruptEntry("file ended early")
    strings = header.pop("__metadata__")
    tensors = {}
    try:
        for name, spec in header.items():
            begin, end = spec["data_offsets"]
            dtype = _NP_DTYPES[spec["dtype"]]
            tensors[name] = buffer[begin:end].view(dtype).reshape(spec["shape"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptEntry(f"bad tensor table: {exc}") from None
    views = [memoryview(a).cast("B") for a in tensors.values()]
    if _hash(_canonical(strings, header), views) != strings.get("content_hash"):
        raise CorruptEntry("content hash does not match")
    return EntryMeta.from_strings(strings), tensors


def touch(path: Path, when: float) -> None:
    """Record a use without rewriting the file: the index takes max(metadata last_use, mtime)."""
    try:
        os.utime(path, (when, when))
    except FileNotFoundError:
        pass


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
