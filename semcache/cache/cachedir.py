"""The cache directory: its lock, the listing of its entry files at start, and quarantine.
Synchronous (the disk tier runs it on its I/O threads).

Layout: `lock` (held with flock by the daemon using the folder, with its pid), `entries/` (one
file per entry, entryfile.py's format) and `quarantine/` (files refused as damaged or planted,
kept for inspection). Anything in `entries/` that is not a regular file is refused too: a FIFO
would block start-up for ever.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable

from semcache.cache.entryfile import SUFFIX, EntryMeta, StoredFile, read_meta, unlink_quietly


class CacheDirLocked(RuntimeError):
    """Another daemon holds this cache directory."""


def lock_dir(directory: Path) -> BinaryIO:
    """Create `directory` and take its exclusive lock; the returned file must stay open. Writing
    the pid into it is best effort: a full disk must not keep the daemon from its own folder."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    (directory / "entries").mkdir(exist_ok=True, mode=0o700)
    (directory / "quarantine").mkdir(exist_ok=True, mode=0o700)
    handle = open(directory / "lock", "a+b")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise CacheDirLocked(
            f"the cache directory {directory} is in use by another semcache daemon "
            "(give this one its own --cache-dir)"
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()).encode())
        handle.flush()
    except OSError:  # ENOSPC, EDQUOT...: the lock is what matters, and it is held
        pass
    return handle


def listing(directory: Path, clean: bool = True) -> list[Path]:
    """The entry files' paths, sorted. With `clean`, temp files left by a crash mid-write are
    deleted: their rename never happened."""
    paths = []
    for path in sorted((directory / "entries").iterdir()):
        if path.name.endswith(".tmp"):
            if clean:
                unlink_quietly(path)
        elif path.suffix == SUFFIX:
            paths.append(path)
    return paths


def read_metas(paths: list[Path], check: Callable[[EntryMeta, dict], None] | None = None,
               ) -> tuple[list[StoredFile], list[Path], list[tuple[Path, OSError]]]:
    """Every file's metadata (read_meta, with `check`); the files to quarantine (not regular, or
    refused); and the files that could not be read (an I/O error says nothing about the file: it
    is left where it is)."""
    good, bad, failed = [], [], []
    for path in paths:
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                bad.append(path)
                continue
            good.append(read_meta(path, check))
        except OSError as exc:
            failed.append((path, exc))
        except Exception:  # whatever is wrong with a file, it is quarantined, never a crash
            bad.append(path)
    return good, bad, failed


def scan(directory: Path, check: Callable[[EntryMeta, dict], None] | None = None,
         ) -> tuple[list[StoredFile], list[Path], list[tuple[Path, OSError]]]:
    """read_metas of the whole listing (temp files deleted)."""
    return read_metas(listing(directory), check)


def quarantine(directory: Path, path: Path) -> None:
    """Move a bad file aside (kept for inspection, out of the index and the disk budget)."""
    try:
        os.replace(path, directory / "quarantine" / path.name)
    except FileNotFoundError:
        pass
