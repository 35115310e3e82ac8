"""The crash test: SIGKILL the daemon at random moments of its cache writes, restart it on the same
cache folder, and check what survived.

The write path (store.write) is temp file, fsync, rename, fsync folder, so a kill at any moment may
leave a `.tmp` (deleted at the next start) but never a torn file under the final name. Each round:
  1. start (or restart) the daemon; time it to /health/ready;
  2. check the folder: no temp file left, nothing quarantined, every file present under its final
     name at the kill is indexed (and nothing else);
  3. verify: every agent sends its next turn and waits for the answer, which must be token-identical
     (compared as text) to a daemon without a cache; an agent with an entry on disk must be served
     from it (cached tokens = the longest entry's tokens, or the whole prompt but its last token);
  4. kill: once the verify turn's files are written, every agent sends the following turn at once;
     the daemon is SIGKILLed at a seeded random moment: while the k-th file of this batch is being
     written (plus a random 0-20 ms), or at a random time after the requests went out (k = 0,
     often mid-prefill). Answers that made it out before the kill must be exact too.
A last restart checks the last kill. Conversations grow by one turn per round; the cold reference
answers come from a second daemon with the cache disabled, computed once per turn.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict
from pathlib import Path

from perf.faults.daemon import MAX_TOKENS, Daemon, cached_of, text_of
from perf.faults.kills import Kill, entry_files, summarize, wait_for_kill_moment
from perf.faults.reference import AGENTS, ColdReference, first_difference

MAX_JITTER = 0.02  # seconds after a write is seen in flight


class CrashRun:
    """The whole procedure (see the module docstring); `run()` returns the report."""

    def __init__(self, workdir: Path, kills: int, seed: int, agents: int = len(AGENTS), say=print):
        self.workdir = workdir
        self.agents = AGENTS[:agents]
        self.cache_dir = workdir / "cache"
        self.kills = kills
        self.rng = random.Random(seed)
        self.seed = seed
        self.started = time.monotonic()
        self.say = lambda text: say(f"[{time.monotonic() - self.started:6.1f} s] {text}")
        self.daemons: list[Daemon] = []
        self.records: list[Kill] = []
        self.wrong_before_kills: list[str] = []  # answers of the first start (no kill to blame)
        self.cold: ColdReference | None = None

    def run(self) -> dict:
        try:
            cold = Daemon(self.workdir / "cold-cache", self.workdir / "cold.log", SEMCACHE_CACHE_ENABLED="false")
            self.daemons.append(cold)
            self.cold = ColdReference(cold.start(), self.agents)
            at_kill: set[str] = set()
            for r in range(self.kills + 1):
                self.cold.ensure(r + 2 if r < self.kills else r + 1)
                d = self.restart(at_kill, self.records[-1] if self.records else None)
                if d is None:
                    break
                self.verify(d, r + 1, self.records[-1] if self.records else None)
                if r == self.kills:
                    d.stop()
                    break
                self.wait_for_writes(d)
                at_kill = self.kill_round(d, r)
        finally:
            for daemon in self.daemons:
                daemon.kill()
        return self.report(time.monotonic() - self.started)

    def start(self) -> Daemon:
        """A new daemon on the cache folder (registered before it spawns: run() always kills it)."""
        self.daemons.append(Daemon(self.cache_dir, self.workdir / f"server-{len(self.daemons)}.log"))
        return self.daemons[-1].start()

    def restart(self, at_kill: set[str], record: Kill | None) -> Daemon | None:
        """Start and check the folder against the files present at the last kill."""
        begin = time.monotonic()
        try:
            d = self.start()
        except (RuntimeError, TimeoutError) as exc:
            self.say(f"restart failed: {exc}")
            return None
        if record is None:
            return d
        record.restart_ok = (self.cache_dir / "lock").read_text() == str(d.proc.pid)
        record.restart_seconds = round(time.monotonic() - begin, 2)
        done, tmp = entry_files(self.cache_dir)
        record.temp_files_left = len(tmp)
        record.quarantined = max(len(os.listdir(self.cache_dir / "quarantine")),
                                 int(d.metric("semcache_cache_quarantined_total")))
        listed = {e["entry_id"] + ".safetensors" for e in d.get_json("/v1/agents")["data"]}
        record.files_indexed = len(listed)
        record.finished_not_indexed = sorted(at_kill - listed)
        record.indexed_not_at_kill = sorted(listed - at_kill)
        return d

    def verify(self, d: Daemon, turn: int, record: Kill | None) -> None:
        """Every agent's turn, answered in full: exact, and served from its entry if it has one."""
        longest: dict[str, int] = {}
        for e in d.get_json("/v1/agents")["data"]:
            longest[e["agent_id"]] = max(longest.get(e["agent_id"], 0), e["tokens"])
        answers = d.chat_all({a: self.cold.messages(a, turn) for a in self.agents})
        wrong = self.check(answers, turn, record)
        served = [a for a in longest if cached_of(answers[a]) == min(
            longest[a], answers[a]["usage"]["prompt_tokens"] - 1)]
        self.say(f"turn {turn}: {len(longest)} agents with entries, {len(served)} served, "
                 f"cached {sorted((a[-1], cached_of(r)) for a, r in answers.items())}, wrong {wrong}")
        if record is not None:
            record.agents_with_entries = len(longest)
            record.agents_served = len(served)
            record.finished_not_served = sorted(set(longest) - set(served))

    def wait_for_writes(self, d: Daemon, timeout: float = 30.0) -> None:
        """Until every listed entry has its file (the verify turn's writes are done), so the kill
        lands among the next batch's own writes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, tmp = entry_files(self.cache_dir)
            listed = {e["entry_id"] + ".safetensors" for e in d.get_json("/v1/agents")["data"]}
            if listed <= done and not tmp:
                return
            time.sleep(0.05)
        self.say(f"writes still pending after {timeout} s")

    def check(self, answers: dict[str, dict], turn: int, record: Kill | None) -> list[str]:
        """The answers that differ from the cold daemon's (recorded on `record`, warm ones as torn)."""
        wrong = []
        for agent, r in sorted(answers.items()):
            want = self.cold.answer(agent, turn)
            if text_of(r) != want:
                wrong.append(f"{agent} turn {turn} (cached {cached_of(r)}): {first_difference(text_of(r), want)}")
                if record is not None:
                    record.torn_served += cached_of(r) > 0
        (record.wrong_answers if record is not None else self.wrong_before_kills).extend(wrong)
        return wrong

    def kill_round(self, d: Daemon, r: int) -> set[str]:
        """Send every agent's next turn and SIGKILL at a seeded random moment; the files left."""
        target = self.rng.randint(0, len(self.agents))
        delay = self.rng.uniform(0.05, 1.5) if target == 0 else self.rng.uniform(0, MAX_JITTER)
        plan = (f"{delay:.3f} s after the requests" if target == 0
                else f"write {target} of the batch in flight, then {delay * 1000:.1f} ms")
        record = Kill(r + 1, plan)
        self.records.append(record)
        before, _ = entry_files(self.cache_dir)
        results: dict = {}
        sent = time.monotonic()
        threads = d.chat_in_background({a: self.cold.messages(a, r + 2) for a in self.agents}, results)
        record.moment = wait_for_kill_moment(self.cache_dir, threads, before, target, delay)
        record.seconds_after_requests = round(time.monotonic() - sent, 3)
        d.kill()
        for t in threads:
            t.join(15)
        at_kill, tmp = entry_files(self.cache_dir)
        answered = {a: res for a, res in results.items() if isinstance(res, dict)}
        record.answers_before_kill = len(answered)
        record.files_at_kill, record.temp_files_at_kill = len(at_kill), len(tmp)
        self.check(answered, r + 2, record)
        self.say(f"kill {r + 1} ({plan}): {record.moment}; {len(answered)} answers, "
                 f"{len(at_kill)} files, {len(tmp)} temp files")
        return at_kill

    def report(self, seconds: float) -> dict:
        return {"benchmark": "faults", "seed": self.seed, "agents": len(self.agents), "max_tokens": MAX_TOKENS,
                "wrong_before_kills": self.wrong_before_kills, "kills": [asdict(k) for k in self.records],
                "summary": summarize(self.records, self.kills, self.wrong_before_kills, seconds)}
