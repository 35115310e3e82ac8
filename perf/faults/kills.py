"""One kill: when it lands (a seeded moment among the cache's writes), what it left on disk, what the
restart after it found and served, and what all kills found, added up."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KILL_WAIT = 60.0  # the longest a round waits for its kill moment


@dataclass
class Kill:
    """One SIGKILL: when it landed, what was on disk, and what the restart after it found and served."""

    round: int
    plan: str
    moment: str = ""
    seconds_after_requests: float = 0.0
    answers_before_kill: int = 0
    files_at_kill: int = 0
    temp_files_at_kill: int = 0
    restart_ok: bool = False
    restart_seconds: float = 0.0
    temp_files_left: int = 0
    quarantined: int = 0
    files_indexed: int = 0
    finished_not_indexed: list[str] = field(default_factory=list)
    indexed_not_at_kill: list[str] = field(default_factory=list)
    agents_with_entries: int = 0
    agents_served: int = 0
    finished_not_served: list[str] = field(default_factory=list)
    wrong_answers: list[str] = field(default_factory=list)  # differs from the cold daemon
    torn_served: int = 0  # of those, answers that reused a cache entry


def entry_files(cache_dir: Path) -> tuple[set[str], set[str]]:
    """(fully renamed entry files, temp files) in entries/."""
    names = set(os.listdir(cache_dir / "entries"))
    return {n for n in names if n.endswith(".safetensors")}, {n for n in names if n.endswith(".tmp")}


def wait_for_kill_moment(cache_dir: Path, threads: list[threading.Thread], before: set[str], target: int,
                         delay: float, timeout: float = KILL_WAIT) -> str:
    """Target 0: sleep `delay`. Else poll entries/ until the target-th new file of this batch is being
    written (a .tmp exists after target-1 new files were renamed), then sleep `delay`. Falls back,
    within `timeout`, to "every request answered and no write caught in flight"."""
    if target == 0:
        time.sleep(delay)
        done, tmp = entry_files(cache_dir)
        return f"{len(done - before)} new files renamed, {len(tmp)} temp files"
    deadline = time.monotonic() + timeout
    answered_at = None
    while time.monotonic() < deadline:
        done, tmp = entry_files(cache_dir)
        new = len(done - before)
        if tmp and new >= target - 1:
            time.sleep(delay)
            return f"a write in flight ({sorted(tmp)[0]}) after {new} new files renamed"
        if not any(t.is_alive() for t in threads):
            answered_at = answered_at or time.monotonic()
            if time.monotonic() - answered_at > 5:
                return f"no write caught in flight; {new} new files renamed"
        time.sleep(0.0005)
    return f"timed out after {timeout} s waiting for a write in flight"


def summarize(records: list[Kill], kills: int, wrong_before_kills: list[str], seconds: float) -> dict:
    """The report's summary: the kills' findings added up."""
    return {
        "kills": len(records),
        "all_restarts_ok": len(records) == kills and all(k.restart_ok for k in records),
        "writes_caught_in_flight": sum(1 for k in records if k.temp_files_at_kill),
        "temp_files_left": sum(k.temp_files_left for k in records),
        "quarantined": sum(k.quarantined for k in records),
        "torn_served": sum(k.torn_served for k in records),
        "finished_not_indexed": sum(len(k.finished_not_indexed) for k in records),
        "finished_not_served": sum(len(k.finished_not_served) for k in records),
        "wrong_answers": len(wrong_before_kills) + sum(len(k.wrong_answers) for k in records),
        "files_at_kill_total": sum(k.files_at_kill for k in records),
        "agents_served_total": sum(k.agents_served for k in records),
        "restart_seconds_max": max((k.restart_seconds for k in records), default=0.0),
        "restart_seconds_mean": round(sum(k.restart_seconds for k in records) / max(1, len(records)), 2),
        "seconds": round(seconds, 1),
    }
