"""The scheduler with an engine that keeps several tokens a step (speculative decoding): endings hold
exactly, the agent cache stores exactly the kept tokens, the metrics count drafts."""

import asyncio

from semcache.engine.types import StepResult
from semcache.scheduler.sequence import FinishReason, Sequence
from tests.conftest import FakeEngine
from tests.test_scheduler import started, stop_tasks  # noqa: F401 (a fixture)


class RunAheadEngine(FakeEngine):
    """Emits the whole rest of its reply in one step, as a fully verified run would (and holds it
    all in the row's KV), reporting each run as drafted and accepted."""

    def __init__(self, tokenizer, reply: str):
        super().__init__(tokenizer, reply=reply)
        self.max_new: dict[int, int | None] = {}

    async def step(self, admit, release, keep=()) -> StepResult:
        for a in admit:
            self.max_new[a.seq_id] = a.max_new
        result = await super().step(admit, release, keep)
        more = {}
        for seq_id, token in result.tokens.items():
            produced = self.active[seq_id]
            more[seq_id] = rest = self.reply_ids[produced:]
            self.fed[seq_id] += [token] + rest[:-1]
            self.active[seq_id] = self.progress[seq_id] = produced + len(rest)
        verified = {seq_id: (len(rest), len(rest)) for seq_id, rest in more.items() if rest}
        return StepResult(result.tokens, result.kept, result.rejected, more, verified)


async def test_max_tokens_cuts_a_verified_run_exactly(tokenizer, stop_tasks):
    engine = RunAheadEngine(tokenizer, "one two three four five six seven eight")
    scheduler, task = await started(engine)
    stop_tasks.append(task)
    seq = Sequence(prompt_ids=list(range(1, 11)), max_tokens=3)
    scheduler.submit(seq)
    text = await seq.text()
    assert seq.output_ids == engine.reply_ids[:3] and seq.finished.reason is FinishReason.LENGTH
    assert text == tokenizer.decode(engine.reply_ids[:3])
    assert engine.max_new[seq.seq_id] == 3  # the engine drafts no further than the sequence may go
    assert scheduler.metrics.accepted_tokens._value.get() > 0
    assert scheduler.metrics.drafted_tokens._value.get() >= scheduler.metrics.accepted_tokens._value.get()


async def test_a_stop_sequence_inside_a_verified_run_ends_it_there(tokenizer, stop_tasks):
    engine = RunAheadEngine(tokenizer, "alpha beta STOP gamma delta")
    scheduler, task = await started(engine)
    stop_tasks.append(task)
    seq = Sequence(prompt_ids=list(range(1, 11)), max_tokens=50, stop=("STOP",))
    scheduler.submit(seq)
    text = await seq.text()
    assert text == "alpha beta " and seq.finished.reason is FinishReason.STOP_SEQUENCE
    assert "gamma" not in tokenizer.decode(seq.output_ids)


async def test_the_agent_cache_stores_exactly_the_kept_tokens(tokenizer, stop_tasks, tmp_path):
    """The row's KV holds a run past max_tokens; the stored entry has only the sequence's tokens,
    each position's KV its own token's."""
    from semcache.cache.index import AgentCache, CacheLimits

    cache = AgentCache(CacheLimits(min_prefix=4), tmp_path)
    await cache.lock()
    await cache.open("fp")
    engine = RunAheadEngine(tokenizer, "one two three four five six seven eight")
    scheduler, task = await started(engine, cache)
    stop_tasks.append(task)
    try:
        seq = Sequence(prompt_ids=list(range(1, 21)), max_tokens=3, agent="a")
        scheduler.submit(seq)
        stored = scheduler.when_stored(seq)
        await seq.text()
        entry = await asyncio.wait_for(stored, 5)
        kept = seq.prompt_ids + seq.output_ids
        assert entry.num_tokens <= len(kept) and list(entry.tokens) == kept[: entry.num_tokens]
        values = entry.data.layers[0][1][0, 0, :, 0].astype(int).tolist()
        assert values == kept[: entry.num_tokens]
    finally:
        task.cancel()
        await cache.close()
