"""Crash and restart on the real embedded model: SIGKILL the daemon while cache files are being
written, restart it on the same cache folder, and check what survived is whole and answers exactly.

The write path (store.write) is temp file, fsync, rename, fsync folder, so a kill at any moment may
leave a `.tmp` (deleted at the next start) but never a torn file under the final name: nothing may
be quarantined. A surviving entry must serve the next turn (cached_tokens > 0) with a greedy answer
token-identical to a daemon that has no cache at all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).parent.parent
TOPICS = ["astronomy", "cooking", "sailing", "chess", "gardening", "music"]
AGENTS = [f"crash-agent.{i}" for i in range(len(TOPICS))]
MAX_TOKENS = 8
START_TIMEOUT = 60.0
REQUEST_TIMEOUT = 120.0
KILL_WAIT = 60.0  # the longest a round waits for its kill moment


def system_prompt(i: int) -> str:
    """A distinct ~300-token system prompt per agent."""
    topic = TOPICS[i]
    return " ".join(f"Rule {k}: as the {topic} assistant number {i}, you always answer questions about "
                    f"{topic} briefly, politely and with one concrete example." for k in range(12))


def turn1(i: int) -> list[dict]:
    return [{"role": "system", "content": system_prompt(i)},
            {"role": "user", "content": f"Give me one tip about {TOPICS[i]}."}]


def turn2(i: int, reply: str) -> list[dict]:
    return turn1(i) + [{"role": "assistant", "content": reply},
                       {"role": "user", "content": "And one more, please."}]


# Helpers: a daemon subprocess and plain urllib requests ---------------------------------------------


class Daemon:
    """`python -m semcache serve` on a free port, with its own log file; kill() / stop() always leave
    no process behind (and are no-ops before start)."""

    def __init__(self, cache_dir: Path, log: Path, **env: str):
        self.cache_dir = cache_dir
        self.log = log
        self.env = {**os.environ, "SEMCACHE_CACHE_MIN_PREFIX": "4", "SEMCACHE_MAX_QUEUE_WAIT": "300", **env}
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.url = ""

    def start(self, timeout: float = START_TIMEOUT) -> Daemon:
        """Spawn and wait until /health/ready is 200. Other processes on this machine pick free ports
        too, so the port only counts as ours once our own log says it is bound (a lost race to bind
        is retried on a new port): /health/ready can never be answered by someone else's server."""
        deadline = time.monotonic() + timeout
        for _ in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            with open(self.log, "w") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "semcache", "serve", "--port", str(self.port),
                     "--cache-dir", str(self.cache_dir)],
                    stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
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
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready in time:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (no final writes, no cleanup)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Graceful SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, n: int | None = 4000) -> str:
        try:
            text = self.log.read_text(errors="replace")
            return text if n is None else text[-n:]
        except OSError:
            return ""

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.load(r)

    def metric(self, name: str, labels: str = "") -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.MULTILINE)
        match = pattern.search(text)
        assert match, f"metric {name}{labels} not found in /metrics"
        return float(match.group(1))

    def chat(self, agent: str, messages: list[dict]) -> dict:
        body = {"model": "m", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
        req = urllib.request.Request(self.url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "X-Agent-ID": agent})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
                return json.load(r)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{agent}: HTTP {exc.code}: {exc.read()[:500]!r}") from None

    def chat_all(self, requests: dict[str, list[dict]]) -> dict[str, dict]:
        """All requests at once, one thread each; waits for every answer."""
        results: dict[str, dict | Exception] = {}
        threads = self.chat_in_background(requests, results)
        for t in threads:
            t.join(REQUEST_TIMEOUT + 10)
        assert not any(t.is_alive() for t in threads), "a request did not finish in time"
        errors = {a: r for a, r in results.items() if isinstance(r, Exception)}
        assert not errors, f"requests failed: {errors}"
        return results  # type: ignore[return-value]

    def chat_in_background(self, requests: dict[str, list[dict]], results: dict) -> list[threading.Thread]:
        def run(agent: str, messages: list[dict]) -> None:
            try:
                results[agent] = self.chat(agent, messages)
            except Exception as exc:  # noqa: BLE001 -- the daemon may be killed mid-request: recorded, not raised
                results[agent] = exc

        threads = [threading.Thread(target=run, args=item, daemon=True) for item in requests.items()]
        for t in threads:
            t.start()
        return threads


def text_of(response: dict) -> str:
    return response["choices"][0]["message"]["content"]


def cached_of(response: dict) -> int:
    return response["usage"]["prompt_tokens_details"]["cached_tokens"]


def first_difference(got: str, want: str) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"first differing character at index {i}: warm {got!r} vs cold {want!r}"


def entry_files(cache_dir: Path) -> tuple[set[str], set[str]]:
    """(fully renamed entry files, temp files) in entries/."""
    names = set(os.listdir(cache_dir / "entries"))
    return {n for n in names if n.endswith(".safetensors")}, {n for n in names if n.endswith(".tmp")}


def wait_for_kill_moment(cache_dir: Path, threads: list[threading.Thread], min_done: int,
                         timeout: float = KILL_WAIT) -> str:
    """Poll entries/ until a write is in flight (a .tmp exists) after `min_done` files were renamed.

    Falls back, within `timeout`, to "every request answered and no write caught in flight" (the
    writes then are all done; the kill still tests a restart). Returns what was seen."""
    deadline = time.monotonic() + timeout
    done_at = None
    while time.monotonic() < deadline:
        done, tmp = entry_files(cache_dir)
        if tmp and len(done) >= min_done:
            return f"a write in flight ({sorted(tmp)}) with {len(done)} files renamed"
        if not any(t.is_alive() for t in threads):
            done_at = done_at or time.monotonic()
            if len(done) >= len(AGENTS) or time.monotonic() - done_at > 5:
                return f"no write caught in flight; {len(done)} files renamed"
        time.sleep(0.0005)
    return f"timed out after {timeout} s waiting for a write in flight"


# The cold reference: a daemon without a cache ------------------------------------------------------


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """Greedy answers from a daemon with the cache disabled: turn 1, and turn 2 built on turn 1."""
    folder = tmp_path_factory.mktemp("cold")
    daemon = Daemon(folder / "cache", folder / "server.log", SEMCACHE_CACHE_ENABLED="false")
    try:
        daemon.start()
        first = daemon.chat_all({a: turn1(i) for i, a in enumerate(AGENTS)})
        replies = {a: text_of(r) for a, r in first.items()}
        second = daemon.chat_all({a: turn2(i, replies[a]) for i, a in enumerate(AGENTS)})
        assert all(cached_of(r) == 0 for r in list(first.values()) + list(second.values()))
        return replies, {a: text_of(r) for a, r in second.items()}
    finally:
        daemon.stop()


# The test --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.model
class TestCrashRestart:
    def test_sigkill_during_writes_then_restart(self, tmp_path, cold):
        """Two SIGKILLs at different moments of write-through; after each restart every renamed file
        is indexed (none quarantined, no temp file left) and serves turn 2 exactly as a cold daemon."""
        cold1, cold2 = cold
        cache_dir = tmp_path / "cache"
        daemons: list[Daemon] = []

        def start() -> Daemon:  # registered before it spawns: the finally below always kills it
            daemons.append(Daemon(cache_dir, tmp_path / f"server-{len(daemons) + 1}.log"))
            return daemons[-1].start()

        try:
            # Round 1: six agents' first turns at once; kill while a later write is in flight.
            d = start()
            results: dict = {}
            threads = d.chat_in_background({a: turn1(i) for i, a in enumerate(AGENTS)}, results)
            moment = wait_for_kill_moment(cache_dir, threads, min_done=2)
            d.kill()
            for t in threads:
                t.join(15)
            assert not any(t.is_alive() for t in threads)
            at_kill, tmp_at_kill = entry_files(cache_dir)
            print(f"round 1 kill: {moment}; at kill {len(at_kill)} files, {len(tmp_at_kill)} temp files")
            for agent, r in results.items():  # answers that made it out before the kill
                if isinstance(r, dict):
                    assert text_of(r) == cold1[agent], f"{agent} turn 1: {first_difference(text_of(r), cold1[agent])}"

            # Restart 1: check the folder, then every agent's turn 2 (kill right after the answers).
            d = start()
            listed = self.check_restart(d, cache_dir, at_kill)
            requests = {a: turn2(i, cold1[a]) for i, a in enumerate(AGENTS)}
            answers = d.chat_all(requests)
            d.kill()  # the new entries' writes (and the old ones' removals) are queued or running now
            at_kill, tmp_at_kill = entry_files(cache_dir)
            print(f"round 2 kill: after all answers; at kill {len(at_kill)} files, {len(tmp_at_kill)} temp files")
            self.check_answers(answers, cold2, warm=listed)

            # Restart 2: the same checks, and turn 2 again from what survived.
            d = start()
            listed = self.check_restart(d, cache_dir, at_kill)
            answers = d.chat_all({a: requests[a] for a in listed})
            self.check_answers(answers, cold2, warm=listed)
            if listed:
                hits = d.metric("semcache_cache_lookups_total", '{result="disk_hit"}')
                partial = d.metric("semcache_cache_lookups_total", '{result="partial"}')
                print(f"restart 2: {len(listed)} agents on disk, {hits} disk hits, {partial} partial")
                assert hits + partial >= len(listed), f"{hits} disk hits for {len(listed)} agents on disk"
            assert d.metric("semcache_cache_quarantined_total") == 0
        finally:
            for daemon in daemons:
                daemon.kill()

    @staticmethod
    def check_restart(d: Daemon, cache_dir: Path, at_kill: set[str]) -> set[str]:
        """No temp file left; every file renamed before the kill is indexed on disk, none quarantined;
        nothing else is indexed. Returns the agents with an entry."""
        assert (cache_dir / "lock").read_text() == str(d.proc.pid), "the daemon answering is not the one started"
        done, tmp = entry_files(cache_dir)
        assert not tmp, f"temp files left after the restart: {sorted(tmp)}"
        quarantined = set(os.listdir(cache_dir / "quarantine"))
        assert d.metric("semcache_cache_quarantined_total") == 0, f"quarantined: {sorted(quarantined)}"
        assert not quarantined, f"quarantined: {sorted(quarantined)}"
        entries = d.get_json("/v1/agents")["data"]
        by_file = {e["entry_id"] + ".safetensors": e for e in entries}
        missing = at_kill - set(by_file) - quarantined
        assert not missing, (f"files present at kill time neither listed nor quarantined: {sorted(missing)}; "
                             f"now in entries/: {sorted(done)}; listed: {entries}\n{d.log_tail()}")
        assert set(by_file) == at_kill == done, f"listed {sorted(by_file)} vs files at kill {sorted(at_kill)}"
        for e in entries:
            assert e["tier"] == "disk" and e["agent_id"] in AGENTS and e["tokens"] > 0, e
        print("restart: on disk", sorted((e["agent_id"], e["tokens"]) for e in entries))
        return {e["agent_id"] for e in entries}

    @staticmethod
    def check_answers(answers: dict[str, dict], want: dict[str, str], warm: set[str]) -> None:
        """Token-identical to the cold daemon (compared as text); agents with an entry were warm."""
        for agent, r in sorted(answers.items()):
            got = text_of(r)
            assert got == want[agent], f"{agent} turn 2 (cached {cached_of(r)}): {first_difference(got, want[agent])}"
            if agent in warm:
                assert cached_of(r) > 0, f"{agent} has an entry on disk but its turn 2 was cold: {r['usage']}"
