"""Bounded loopback stress, driving the workloads of perf/stress/ (one implementation).

Which daemon each test uses, and why:
- overload: a real `python -m semcache serve` subprocess on the embedded model. Refusal latency is
  a claim about the daemon's event loop while an MLX thread competes for the two cores, and the
  client must not share the server's process (and GIL). It is `slow`; the mechanism behind it
  (places reserved before tokenizing) is checked in-process by TestQueuePlaces.
- disconnect storm, fast agent bursts: an in-process app on the FakeEngine, so the test can read
  the Scheduler and the engine's rows directly (leaks, steps) and runs in seconds.
- agents (10 x 50) and sustained load: the real model, whose KV entries have real sizes, so the byte
  budgets, the disk tier and RSS mean something. Both are `slow`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time

import pytest

from perf.servers import daemon
from perf.stress.bursts import agent_bursts
from perf.stress.conversations import ANTHROPIC
from perf.stress.disconnect import disconnect_storm
from perf.stress.overload import overload
from perf.stress.sustained import sustained
from semcache.http.appkeys import INFLIGHT, SERVICE
from semcache.scheduler.scheduler import Overloaded
from tests.conftest import FakeEngine, count_tokenize

STEP = 0.02  # the fake engine's step time
LONG_REPLY = " ".join(f"word{i}" for i in range(120))


def assert_checks(report: dict) -> None:
    failed = sorted(name for name, ok in report["checks"].items() if not ok)
    shown = {k: v for k, v in report.items() if k not in ("results", "samples_every_2s")}
    assert not failed, f"failed checks {failed}: {json.dumps(shown, default=str)[:4000]}"


class RecordingEngine(FakeEngine):
    """The fake engine, recording for every step when it started and which rows it held after."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[float, set[int]]] = []

    async def step(self, admit, release, keep=()):
        started = time.perf_counter()
        result = await super().step(admit, release, keep)
        self.steps.append((started, set(self.active)))
        return result


class TestQueuePlaces:
    async def test_a_burst_at_idle_gets_max_active_plus_max_queue_places(self, make_client, tokenizer):
        """Places are reserved before tokenizing; free batch slots add to max_queue, so an idle
        daemon accepts max_active + max_queue of a burst and refuses the next at once."""
        client = await make_client(FakeEngine(tokenizer), max_active=3, max_queue=5)
        scheduler = client.app[SERVICE].scheduler
        for _ in range(8):
            scheduler.reserve()
        assert scheduler.queue_full
        with pytest.raises(Overloaded, match="queue is full") as info:
            scheduler.reserve()
        assert info.value.retry_after >= 1
        for _ in range(8):
            scheduler.unreserve()
        assert not scheduler.queue_full
        scheduler.check_integrity()

    async def test_refused_requests_are_never_tokenized(self, make_client, tokenizer):
        """20 concurrent requests against 2 slots + 3 queue places: 5 are tokenized and served,
        15 are refused (529/503 with Retry-After) without rendering their prompts."""
        client = await make_client(FakeEngine(tokenizer, step_delay=0.05), max_active=2, max_queue=3)
        tokenized = count_tokenize(client.app[SERVICE])
        body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        posts = [client.post("/v1/messages" if i % 2 else "/v1/chat/completions", json=body,
                             headers=ANTHROPIC if i % 2 else {}) for i in range(20)]
        responses = await asyncio.gather(*posts)
        statuses = sorted(r.status for r in responses)
        assert statuses.count(200) == 5 and len(tokenized) == 5, (statuses, len(tokenized))
        refused = [r for r in responses if r.status != 200]
        assert {r.status for r in refused} <= {503, 529} and all("Retry-After" in r.headers for r in refused)


    async def test_a_ready_daemon_keeps_its_start_up_heap_out_of_collections(self, make_client, tokenizer):
        """Once loaded, the start-up heap is frozen, so a full collection during a burst scans only
        what requests allocated instead of pausing the event loop for the whole model's objects."""
        gc.unfreeze()
        client = await make_client(FakeEngine(tokenizer))
        assert client.app[SERVICE].loaded
        assert gc.get_freeze_count() > 1000


class TestDisconnectStorm:
    async def test_every_slot_is_free_before_the_next_step(self, make_client, tokenizer):
        """48 streams dropped at random points (queued, before or after tokens; RST or FIN) leave
        nothing behind: the scheduler frees each slot when it sees the drop, the engine drops every
        row in the first step that starts after the last drop was seen, and a new request is
        admitted at the next step."""
        engine = RecordingEngine(tokenizer, reply=LONG_REPLY, step_delay=STEP)
        client = await make_client(engine, max_active=8, max_queue=64)
        scheduler = client.app[SERVICE].scheduler
        seen: list[float] = []  # when the server aborted a sequence it had not finished
        abort = scheduler.abort

        def recording_abort(seq):
            if not seq.is_done:
                seen.append(time.perf_counter())
            abort(seq)

        scheduler.abort = recording_abort
        base = str(client.make_url("")).rstrip("/")
        report = await disconnect_storm(base, n=48, max_tokens=64, max_chunks=12)
        assert_checks(report)
        assert len(seen) >= 40, f"only {len(seen)} of 48 sequences were aborted (most must be dropped)"
        last_seen = max(seen)
        assert last_seen - report["last_drop_at"] < STEP, "the server noticed a dropped client late"
        storm = set(engine.admitted[:-1])  # the last one admitted is the probe
        first_after = next(active for started, active in engine.steps if started >= last_seen)
        assert not storm & first_after, "the engine still held dropped sequences after the next step"
        assert report["probe_queue_wait_s"] <= 2 * STEP + 0.02
        scheduler.check_integrity()
        assert (scheduler.num_running, scheduler.num_waiting) == (0, 0)
        running = scheduler.running
        assert not running.seqs and not running.kv_reserved and not running.release and not running.keep
        assert client.app[INFLIGHT].count == 0, "a handler of a dropped stream is still running"
        assert not engine.active and not engine.prefix_errors


class TestAgentBursts:
    async def test_rapid_turns_always_reuse_the_agents_cache(self, make_client, tokenizer):
        """10 agents x 10 back-to-back turns on the fake engine: every turn is served, and every
        turn after an agent's first reports cached tokens (the fake KV makes a wrong hit fail)."""
        engine = FakeEngine(tokenizer)
        client = await make_client(engine, max_active=4)
        report = await agent_bursts(str(client.make_url("")).rstrip("/"), agents=10, turns=10)
        assert_checks(report)
        assert report["requests"] == 100 and not engine.prefix_errors

    @pytest.mark.slow
    @pytest.mark.model
    def test_ten_agents_fifty_turns_on_the_model(self, tmp_path):
        """The issue's 10 agents x 50 rapid requests on the embedded model, 4 tokens each."""
        with daemon(tmp_path, "agents", {"SEMCACHE_MAX_QUEUE_WAIT": "600"}) as d:
            report = asyncio.run(agent_bursts(d.base, agents=10, turns=50, max_tokens=4))
        assert_checks(report)
        assert report["requests"] == 500


@pytest.mark.slow
@pytest.mark.model
class TestOverload:
    def test_burst_of_200_against_a_queue_of_64(self, tmp_path):
        """200 requests at once on open connections, max_queue 64: only 200s and refusals (429/503/
        529) with Retry-After, refusals within 100 ms (p95), no timeouts or other 5xx, at most
        max_active + max_queue served (see stress.overload), and the daemon answers afterwards."""
        env = {"SEMCACHE_MAX_QUEUE": "64", "SEMCACHE_MAX_ACTIVE": "16", "SEMCACHE_MAX_QUEUE_WAIT": "300"}
        with daemon(tmp_path, "overload", env) as d:
            report = asyncio.run(overload(d.base, n=200, max_active=16, max_queue=64, max_tokens=1))
        assert_checks(report)
        assert report["num_refused"] >= 200 - 16 - 64


@pytest.mark.slow
@pytest.mark.model
class TestSustained:
    def test_sixty_seconds_of_agents_within_budgets(self, tmp_path):
        """60 s of 6 agent loops over 12 conversations of every length (streamed or not, both
        dialects; ended conversations replaced by new agents) on cache budgets that hold about 10 of
        them: stored KV within the budgets (memory + one entry), RSS flat after warm-up, p95 of the
        last 20 s within 1.5x of the first window after warm-up, no errors, the disk tier in use."""
        memory, disk = 32 << 20, 128 << 20
        env = {"SEMCACHE_CACHE_MEMORY_BUDGET": str(memory), "SEMCACHE_CACHE_DISK_BUDGET": str(disk)}
        with daemon(tmp_path, "sustained", env) as d:
            report = asyncio.run(sustained(d.base, d.pid, 60.0, memory, disk, concurrency=6, population=12))
        assert_checks(report)
        assert report["requests"] >= 30
