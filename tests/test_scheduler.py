"""The scheduler loop on a fake engine: order, budgets, refusals, aborts."""

import asyncio

import pytest

from semcache.http.appkeys import SERVICE
from semcache.scheduler.scheduler import Limits, Overloaded, Scheduler, TooLarge
from semcache.scheduler.sequence import FinishReason, Sequence, Status
from tests.conftest import FakeEngine


async def started(engine, cache=None, **limits) -> tuple[Scheduler, asyncio.Task]:
    await engine.load()
    limits.setdefault("batch_wait", 0.0)
    scheduler = Scheduler(engine, Limits(**limits), cache)
    scheduler.ready = True
    _schedulers.append(scheduler)
    original = engine.step

    async def checked_step(admit, release, keep=()):
        try:
            scheduler.check_integrity()
            if cache is not None:
                cache.check_integrity()
        except AssertionError as exc:  # the loop would swallow it as an engine failure
            _violations.append(exc)
            raise
        return await original(admit, release, keep)

    engine.step = checked_step
    return scheduler, asyncio.create_task(scheduler.run())


def seq(n_prompt=10, max_tokens=4, priority=0) -> Sequence:
    return Sequence(prompt_ids=list(range(1, n_prompt + 1)), max_tokens=max_tokens, priority=priority)


_schedulers: list[Scheduler] = []
_violations: list[AssertionError] = []


@pytest.fixture
async def stop_tasks():
    """Cancels the loop tasks after the test, having checked every scheduler's invariants."""
    tasks = []
    _schedulers.clear()
    _violations.clear()
    yield tasks
    assert not _violations, f"invariant broken during the test: {_violations[0]}"
    for scheduler in _schedulers:
        scheduler.check_integrity()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class TestScheduler:
    async def test_generates_until_max_tokens(self, tokenizer, stop_tasks):
        """A sequence gets exactly max_tokens tokens and finishes with LENGTH."""
        scheduler, task = await started(FakeEngine(tokenizer))
        stop_tasks.append(task)
        s = seq(max_tokens=3)
        scheduler.submit(s)
        text = await s.text()
        assert s.num_output_tokens == 3
        assert s.finished.reason is FinishReason.LENGTH
        assert text == "The quick brown"

    async def test_eos_ends_with_end(self, tokenizer, stop_tasks):
        """The reply ends at EOS with END and the whole canned text."""
        scheduler, task = await started(FakeEngine(tokenizer))
        stop_tasks.append(task)
        s = seq(max_tokens=100)
        scheduler.submit(s)
        assert await s.text() == "The quick brown fox jumps over the lazy dog."
        assert s.finished.reason is FinishReason.END

    async def test_stop_sequence_ends_and_is_not_returned(self, tokenizer, stop_tasks):
        """A stop string across token boundaries ends generation and is reported."""
        scheduler, task = await started(FakeEngine(tokenizer))
        stop_tasks.append(task)
        s = Sequence(prompt_ids=[1, 2], max_tokens=100, stop=("wn fo",))
        scheduler.submit(s)
        assert await s.text() == "The quick bro"
        assert (s.finished.reason, s.finished.stop_sequence) == (FinishReason.STOP_SEQUENCE, "wn fo")

    async def test_priority_then_fifo(self, tokenizer, stop_tasks):
        """With one slot, lower priority values run first, and arrival order within a priority."""
        engine = FakeEngine(tokenizer)
        scheduler, task = await started(engine, max_active=1)
        stop_tasks.append(task)
        blocker = seq(max_tokens=3)
        scheduler.submit(blocker)
        await asyncio.sleep(0)
        seqs = [seq(priority=p) for p in (5, 1, 5, 0, 1)]
        for s in seqs:
            scheduler.submit(s)
        await asyncio.gather(*(s.text() for s in seqs + [blocker]))
        order = [s.seq_id for s in sorted(seqs, key=lambda s: (s.priority, seqs.index(s)))]
        assert engine.admitted == [blocker.seq_id] + order

    async def test_max_active_is_never_exceeded(self, tokenizer, stop_tasks):
        """No more than max_active sequences run at once; the rest wait and are all served."""
        engine = FakeEngine(tokenizer, step_delay=0.001)
        scheduler, task = await started(engine, max_active=3)
        stop_tasks.append(task)
        seen = []
        orig = engine.step

        async def spy(admit, release, keep=()):
            out = await orig(admit, release, keep)
            seen.append(len(engine.active))
            return out

        engine.step = spy
        seqs = [seq(max_tokens=5) for _ in range(10)]
        for s in seqs:
            scheduler.submit(s)
        await asyncio.gather(*(s.text() for s in seqs))
        assert max(seen) == 3
        assert all(s.num_output_tokens == 5 for s in seqs)

    async def test_kv_budget_limits_admission(self, tokenizer, stop_tasks):
        """Sequences are admitted only while their reserved KV bytes fit kv_budget."""
        engine = FakeEngine(tokenizer, kv_bytes_per_token=100)
        # each needs (10 + 10) * 100 = 2000 bytes; budget 5000 fits two at a time
        scheduler, task = await started(engine, kv_budget=5000)
        stop_tasks.append(task)
        peak = 0
        orig = engine.step

        async def spy(admit, release, keep=()):
            nonlocal peak
            out = await orig(admit, release, keep)
            peak = max(peak, len(engine.active))
            return out

        engine.step = spy
        seqs = [seq(max_tokens=10) for _ in range(5)]
        for s in seqs:
            scheduler.submit(s)
        await asyncio.gather(*(s.text() for s in seqs))
        assert peak == 2

    async def test_request_that_can_never_fit_is_refused_at_once(self, tokenizer, stop_tasks):
        """A sequence larger than the whole KV budget is TooLarge at submit, not a timeout."""
        scheduler, task = await started(FakeEngine(tokenizer, kv_bytes_per_token=100), kv_budget=1000)
        stop_tasks.append(task)
        with pytest.raises(TooLarge, match="kv_budget"):
            scheduler.submit(seq(n_prompt=10, max_tokens=10))

    async def test_full_queue_refuses_immediately_with_retry_after(self, tokenizer, stop_tasks):
        """Past max_queue waiting requests, submit raises Overloaded with a positive retry_after."""
        engine = FakeEngine(tokenizer, step_delay=0.05)
        scheduler, task = await started(engine, max_active=1, max_queue=2)
        stop_tasks.append(task)
        scheduler.submit(seq(max_tokens=50))
        await asyncio.sleep(0.01)
        scheduler.submit(seq())
        scheduler.submit(seq())
        assert scheduler.queue_full
        with pytest.raises(Overloaded) as info:
            scheduler.submit(seq())
        assert info.value.retry_after >= 1

    async def test_queue_deadline_refuses_and_frees_the_place(self, tokenizer, stop_tasks):
        """A request still waiting after max_queue_wait is refused and leaves the queue."""
        engine = FakeEngine(tokenizer, step_delay=0.02)
        scheduler, task = await started(engine, max_active=1, max_queue_wait=0.1)
        stop_tasks.append(task)
        scheduler.submit(seq(max_tokens=100))
        waiting = seq()
        scheduler.submit(waiting)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(Overloaded, match="waited"):
            await scheduler.wait_admitted(waiting)
        assert 0.09 < loop.time() - t0 < 0.5
        assert waiting.status is Status.ABORTED
        assert scheduler.num_waiting == 0

    async def test_abort_frees_the_slot_before_the_next_step(self, tokenizer, stop_tasks):
        """Aborting a running sequence releases it in the very next engine step."""
        engine = FakeEngine(tokenizer, step_delay=0.01)
        scheduler, task = await started(engine, max_active=1)
        stop_tasks.append(task)
        first, second = seq(max_tokens=1000), seq(max_tokens=2)
        scheduler.submit(first)
        scheduler.submit(second)
        await scheduler.wait_admitted(first)
        await asyncio.sleep(0.03)
        scheduler.abort(first)
        assert scheduler.num_running == 0
        await scheduler.wait_admitted(second)
        assert engine.released[0] == first.seq_id
        await second.text()
        assert first.finished.reason is FinishReason.ABORT

    async def test_burst_at_idle_is_admitted_together(self, tokenizer, stop_tasks):
        """Requests arriving a few ms apart at an idle server join the same first step."""
        engine = FakeEngine(tokenizer)
        scheduler, task = await started(engine, batch_wait=0.05)
        stop_tasks.append(task)
        seqs = [seq(max_tokens=2) for _ in range(4)]
        for s in seqs:
            scheduler.submit(s)
            await asyncio.sleep(0.005)
        await asyncio.gather(*(s.text() for s in seqs))
        assert engine.num_steps == 2 + 1  # two tokens each, all admitted in step 1; one step releases

    async def test_not_ready_refuses(self, tokenizer):
        """Before the model is loaded, submit raises Overloaded."""
        scheduler = Scheduler(FakeEngine(tokenizer), Limits())
        with pytest.raises(Overloaded, match="loading"):
            scheduler.submit(seq())

    async def test_engine_failure_ends_running_sequences_and_loop_survives(self, tokenizer, stop_tasks):
        """An exception in a step ends the running sequences with ERROR; later requests still work."""
        engine = FakeEngine(tokenizer)
        scheduler, task = await started(engine)
        stop_tasks.append(task)
        engine.fail_next_step = True
        s = seq()
        scheduler.submit(s)
        await s.text()
        assert s.finished.reason is FinishReason.ERROR
        t = seq(max_tokens=2)
        scheduler.submit(t)
        await t.text()
        assert t.finished.reason is FinishReason.LENGTH

    async def test_slow_reader_is_aborted(self, tokenizer, stop_tasks):
        """A stream whose unread buffer passes stream_buffer is ended with an error."""
        engine = FakeEngine(tokenizer, reply="a" * 400)
        scheduler, task = await started(engine, stream_buffer=5)
        stop_tasks.append(task)
        s = seq(max_tokens=1000)
        scheduler.submit(s)
        while not s.is_done:
            await asyncio.sleep(0.001)
        assert s.finished.reason is FinishReason.ERROR
        assert "slowly" in s.finished.error


async def first_turn(scheduler, cache) -> Sequence:
    """Agent "a"'s first turn (20 prompt tokens, 3 generated), run until its entry is stored."""
    first = Sequence(prompt_ids=list(range(1, 21)), max_tokens=3, agent="a")
    scheduler.submit(first)
    await first.text()
    for _ in range(100):
        if cache.agents("default", "a"):
            break
        await asyncio.sleep(0.01)
    return first


class TestWithAgentCache:
    async def test_disk_entry_loads_while_the_request_waits(self, tokenizer, stop_tasks, tmp_path):
        """A queued request whose entry is on disk has it in memory before a slot frees up, and runs
        from it: its prefix is its own prompt's start (checked by the fake engine)."""
        from semcache.cache.index import AgentCache, CacheLimits

        cache = AgentCache(CacheLimits(min_prefix=4), tmp_path)
        await cache.lock()
        await cache.open("fp")
        engine = FakeEngine(tokenizer, step_delay=0.005)
        scheduler, task = await started(engine, cache, max_active=1)
        stop_tasks.append(task)
        try:
            first = await first_turn(scheduler, cache)
            await cache.evict("default", "a")
            entry = cache.agents("default", "a")[0]
            assert entry.tier == "disk"
            blocker = seq(max_tokens=40)
            scheduler.submit(blocker)
            await scheduler.wait_admitted(blocker)
            follow = Sequence(prompt_ids=first.prompt_ids + first.output_ids + [7, 8], max_tokens=2, agent="a")
            scheduler.submit(follow)
            for _ in range(100):
                if entry.data is not None:
                    break
                await asyncio.sleep(0.005)
            assert entry.data is not None and follow.status is Status.WAITING
            await follow.text()
            assert follow.num_cached_tokens == entry.num_tokens and engine.prefix_errors == []
            assert follow.finished.reason is FinishReason.LENGTH
        finally:
            task.cancel()
            await cache.close()


    async def test_a_hit_the_engine_cannot_use_is_quarantined_and_its_request_runs_cold(self, tokenizer, stop_tasks,
                                                                                         tmp_path):
        """The engine fails on a hit's KV (and runs that row from scratch): the request ends normally
        with no cached tokens reported, the entry is quarantined (never served again), and the
        request beside it in the batch is untouched."""
        from semcache.cache.index import AgentCache, CacheLimits

        cache = AgentCache(CacheLimits(min_prefix=4), tmp_path)
        await cache.lock()
        await cache.open("fp")
        engine = FakeEngine(tokenizer)
        scheduler, task = await started(engine, cache)
        stop_tasks.append(task)
        try:
            first = await first_turn(scheduler, cache)
            await cache.settle()
            entry = cache.agents("default", "a")[0]
            name = entry.path.name
            engine.reject_prefixes = True
            follow = Sequence(prompt_ids=first.prompt_ids + first.output_ids + [7, 8], max_tokens=2, agent="a")
            beside = Sequence(prompt_ids=list(range(100, 112)), max_tokens=2)
            scheduler.submit(follow)
            scheduler.submit(beside)
            await follow.text()
            await beside.text()
            assert engine.rejected == [follow.seq_id]
            assert follow.finished.reason is FinishReason.LENGTH and beside.finished.reason is FinishReason.LENGTH
            assert follow.num_cached_tokens == 0 and beside.num_cached_tokens == 0
            await cache.settle()
            assert entry.removed and entry not in cache.agents("default", "a")
            assert {p.name for p in (tmp_path / "quarantine").iterdir()} == {name}
            cache.check_integrity()
        finally:
            task.cancel()
            await cache.close()


class TestKVGrowth:
    """KV is reserved a step ahead of each sequence, not for all the output it may ask for."""

    async def test_sixteen_requests_for_32000_tokens_run_together(self, make_client, tokenizer):
        """On a 32K-context model with an 8B's KV per token (128 KiB, fp16), 16 requests with
        max_tokens 32000 are admitted together under the default 4 GiB kv_budget (reserving
        their whole allowance would need 4 GiB each)."""

        class Counting(FakeEngine):
            most = 0

            async def step(self, admit, release, keep=()):
                result = await super().step(admit, release, keep)
                Counting.most = max(Counting.most, len(self.active))
                return result

        engine = Counting(tokenizer, context_length=32768, kv_bytes_per_token=128 << 10, step_delay=0.01)
        client = await make_client(engine=engine)
        body = {"model": "m", "max_tokens": 32000, "messages": [{"role": "user", "content": "Hi"}]}
        responses = await asyncio.gather(*(client.post("/v1/messages", json=body,
                                                       headers={"anthropic-version": "2023-06-01"})
                                           for _ in range(16)))
        assert [r.status for r in responses] == [200] * 16
        assert Counting.most == 16

    async def test_a_preempted_sequence_resumes_from_its_stored_kv(self, make_client, tokenizer):
        """Two long answers on a budget that holds one: the newest is preempted (its KV stored),
        resumes from that KV without a new prefill, and both answers come out whole."""
        reply = " ".join(f"w{i}" for i in range(60))
        engine = FakeEngine(tokenizer, reply=reply, kv_bytes_per_token=1000)
        client = await make_client(engine=engine, kv_budget=330_000, kv_grow_tokens=16)
        service = client.app[SERVICE]
        bodies = [{"model": "m", "max_tokens": 500, "messages": [{"role": "user", "content": f"Go {i}"}]}
                  for i in range(2)]
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=b, headers={"X-Agent-ID": f"a{i}"})
                                           for i, b in enumerate(bodies)))
        answers = [await r.json() for r in responses]
        assert [a["choices"][0]["message"]["content"] for a in answers] == [reply, reply]
        assert service.scheduler.metrics.preemptions._value.get() >= 1
        resumed = [i for i, n in engine.hits.items() if n > 40]
        assert resumed, engine.hits  # re-admitted with its prompt and output read from its KV
        assert not engine.prefix_errors
        assert all(a["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 for a in answers)
        service.scheduler.check_integrity()


def test_a_deletion_covers_only_its_own_agent_or_tenant_and_only_earlier_requests():
    """Deletion wins (scheduler/deletions.py): a sequence's KV is dropped when its agent, or its
    whole tenant, was deleted after its request started; one that started later stores as usual.
    Deletions older than the remembered ones count as covering every request that lived through them."""
    from semcache.scheduler.deletions import Deletions

    deletions = Deletions(remembered=3)
    before = deletions.count
    assert not deletions.covers(before, "t", "a")
    deletions.record("t", "b")
    assert deletions.covers(before, "t", "b") and not deletions.covers(before, "t", "a")
    assert not deletions.covers(before, "u", "b")  # another tenant's agent of the same name
    deletions.record("u")
    assert deletions.covers(before, "u", "a") and deletions.covers(before, "u", None)
    after = deletions.count
    assert not deletions.covers(after, "t", "b") and not deletions.covers(after, "u", "a")
    for _ in range(3):
        deletions.record("v", "z")
    assert deletions.covers(before, "t", "a")  # lived through deletions no longer remembered: dropped
    assert not deletions.covers(after, "t", "a")  # every deletion since it started is remembered
