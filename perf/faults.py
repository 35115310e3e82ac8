"""python -m perf faults --kills 20 --out report.json [--seed 7] [--keep DIR]

SIGKILL the daemon (real embedded model) at random moments of its cache writes, restart it on the
same cache folder, and check what survived. tests/test_restart.py runs the same procedure with 5 kills.

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

import json
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from perf import servers
from perf.common import machine_info

TOPICS = ["astronomy", "cooking", "sailing", "chess", "gardening", "music"]
AGENTS = [f"crash-agent.{i}" for i in range(len(TOPICS))]
FOLLOW_UP = "And one more, please."
MAX_TOKENS = 8
RULES = 6  # sentences of each system prompt
REQUEST_TIMEOUT = 120.0
KILL_WAIT = 60.0  # the longest a round waits for its kill moment
MAX_JITTER = 0.02  # seconds after a write is seen in flight


def system_prompt(i: int) -> str:
    """A distinct ~180-token system prompt per agent (its KV file is ~8 MB in float32)."""
    topic = TOPICS[i]
    return " ".join(f"Rule {k}: as the {topic} assistant number {i}, you always answer questions about "
                    f"{topic} briefly, politely and with one concrete example." for k in range(RULES))


def conversation(i: int, replies: list[str]) -> list[dict]:
    """Agent i's next turn after the given assistant replies (turn 1 when there are none)."""
    messages = [{"role": "system", "content": system_prompt(i)},
                {"role": "user", "content": f"Give me one tip about {TOPICS[i]}."}]
    for reply in replies:
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": FOLLOW_UP}]
    return messages


# A daemon subprocess and plain urllib requests ---------------------------------------------------


class Daemon(servers.Daemon):
    """A semcache daemon as the crash test runs it: prompts from 4 tokens cached, a long queue wait,
    and blocking chat requests (one thread each when sent together)."""

    def __init__(self, cache_dir: Path, log: Path, **env: str):
        super().__init__(cache_dir, log, **{"SEMCACHE_CACHE_MIN_PREFIX": "4", "SEMCACHE_MAX_QUEUE_WAIT": "300", **env})

    def chat(self, agent: str, messages: list[dict]) -> dict:
        body = {"model": "m", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
        req = urllib.request.Request(self.base + "/v1/chat/completions", json.dumps(body).encode(),
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


# The cold reference ---------------------------------------------------------------------------------


class ColdReference:
    """Greedy answers of a daemon without a cache, turn by turn; each turn is built on the previous
    cold answers (a warm daemon must give the same ones, so its conversations are the same)."""

    def __init__(self, daemon: Daemon, agents: list[str]):
        self.daemon = daemon
        self.replies: dict[str, list[str]] = {a: [] for a in agents}

    def messages(self, agent: str, turn: int) -> list[dict]:
        """Agent's turn (1-based), computing the cold answers it builds on if needed."""
        self.ensure(turn - 1)
        return conversation(AGENTS.index(agent), self.replies[agent][: turn - 1])

    def answer(self, agent: str, turn: int) -> str:
        self.ensure(turn)
        return self.replies[agent][turn - 1]

    def ensure(self, turns: int) -> None:
        while len(next(iter(self.replies.values()))) < turns:
            done = len(next(iter(self.replies.values())))
            answers = self.daemon.chat_all({a: conversation(AGENTS.index(a), r) for a, r in self.replies.items()})
            for agent, r in answers.items():
                assert cached_of(r) == 0, f"the cold daemon used a cache: {r['usage']}"
                self.replies[agent].append(text_of(r))
            assert all(len(v) == done + 1 for v in self.replies.values())


# One kill and what the next start finds --------------------------------------------------------------


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
        records = [asdict(k) for k in self.records]
        summary = {
            "kills": len(self.records),
            "all_restarts_ok": len(self.records) == self.kills and all(k.restart_ok for k in self.records),
            "writes_caught_in_flight": sum(1 for k in self.records if k.temp_files_at_kill),
            "temp_files_left": sum(k.temp_files_left for k in self.records),
            "quarantined": sum(k.quarantined for k in self.records),
            "torn_served": sum(k.torn_served for k in self.records),
            "finished_not_indexed": sum(len(k.finished_not_indexed) for k in self.records),
            "finished_not_served": sum(len(k.finished_not_served) for k in self.records),
            "wrong_answers": len(self.wrong_before_kills) + sum(len(k.wrong_answers) for k in self.records),
            "files_at_kill_total": sum(k.files_at_kill for k in self.records),
            "agents_served_total": sum(k.agents_served for k in self.records),
            "restart_seconds_max": max((k.restart_seconds for k in self.records), default=0.0),
            "restart_seconds_mean": round(sum(k.restart_seconds for k in self.records) / max(1, len(self.records)), 2),
            "seconds": round(seconds, 1),
        }
        return {"benchmark": "faults", "seed": self.seed, "agents": len(self.agents), "max_tokens": MAX_TOKENS,
                "wrong_before_kills": self.wrong_before_kills, "kills": records, "summary": summary}


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


# python -m perf faults ---------------------------------------------------------------------------


def configure(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("perf-faults.json"))
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--agents", type=int, default=len(AGENTS), help=f"concurrent agents (at most {len(AGENTS)})")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, cache files)")


def main(args) -> dict:
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="semcache-perf-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = CrashRun(workdir, args.kills, args.seed, args.agents, say=lambda s: print(s, flush=True)).run()
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report["machine"] = machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return report
