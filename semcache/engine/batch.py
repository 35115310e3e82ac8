"""The running batch, on the MLX thread only: prefill (batched or chunked) and batched decode.

One `step`: drop released sequences; one decode step for every decoding sequence together; then
prompt work bounded by `prefill_chunk` tokens: either one chunk of a long prompt, or several short
prompts prefilled together (left-padded, masked), which then join the decode batch. Prefill computes
logits only for the last position (the vocabulary projection is a fifth of the model's work).

A hit's KV is checked against the model's layout; a prefill failing with a hit in it fails that row
alone: it restarts from scratch, reported in `rejected` (the scheduler quarantines the entry).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from semcache.engine.batchkv import restore, snapshot
from semcache.engine.raggedkv import RaggedKV
from semcache.cache.kvdata import KVData
from semcache.cache.layout import KVLayout
from semcache.engine.forward import Forward
from semcache.engine.grouping import short_group
from semcache.engine.sampling import sample_batch
from semcache.engine.types import Admission, StepResult
from semcache.engine.stepcost import StepCost
from semcache.engine.verify import Row, decode

log = logging.getLogger("semcache.engine")
IDLE_GROUP_FACTOR = 4


@dataclass(eq=False)
class _Prefill:
    admission: Admission
    row: Row
    cache: list[Any] | None = None
    done: int = 0
    hit: bool = False  # resumes a cached prefix
    alone: bool = False  # a group with it failed: from now on it is prefilled on its own

    @property
    def remaining(self) -> int:
        return len(self.admission.prompt_ids) - self.done


@dataclass(eq=False)
class _Decoding:
    rows: list[Row] = field(default_factory=list)
    # One row: plain KVCaches (no mask, the exact single-sequence path, ~5% faster); more: BatchKVCaches.
    cache: list[Any] | None = None
    inputs: Any = None  # mx.array [B]: each row's latest token, reported, not yet fed to the model


class Batcher:
    """All MLX state for continuous batching. Not thread-safe: call only from the MLX thread."""

    def __init__(self, model: Any, prefill_chunk: int, layout: KVLayout | None = None, max_draft: int = 0,
                 forward: Forward | None = None):
        self.model = model
        self.max_draft = max_draft  # prompt-lookup speculation: the longest draft (0: off)
        self.step_cost = StepCost()  # what a decode step costs here, learnt (speculation's widths)
        self.prefill_chunk = prefill_chunk
        self.layout = layout  # the model's KV, which a hit's must match (None: not checked)
        self.prefills: list[_Prefill] = []
        self.decoding = _Decoding()
        self.rejected: set[int] = set()  # this step's rows whose cached prefix could not be used
        self._joining = False  # a group is joining the decode batch (a failure now is the batch's)
        self._forward = forward or Forward(model)  # built once per model: it times the head at load

    def restarted(self) -> "Batcher":
        """A clean batch on the same model (after a failed step), keeping what was learnt about
        the model and the machine: its forward pass and the measured step cost."""
        fresh = Batcher(self.model, self.prefill_chunk, self.layout, self.max_draft, self._forward)
        fresh.step_cost = self.step_cost
        return fresh

    def step(self, admit: list[Admission], release: list[int], keep: Collection[int] = ()) -> StepResult:
        """Drop `release` (copying out the KV of those in `keep`), queue `admit` for prefill (a hit
        starts from its own copy of the cached prefix), and advance everything one step."""
        self.rejected = set()
        kept = self._release(set(release), set(keep)) if release else {}
        self.prefills.extend(self._admitted(a) for a in admit)
        verified = self._decode() if self.decoding.rows else None
        out = {seq_id: kept[0] for seq_id, kept in verified.items()} if verified else {}
        if self.prefills:
            out.update(self._prefill())
        more = {seq_id: kept[1:] for seq_id, kept in verified.items() if len(kept) > 1} if verified else {}
        return StepResult(out, kept, frozenset(self.rejected), more, verified.stats if verified else {})

    def _admitted(self, a: Admission) -> _Prefill:
        p = _Prefill(a, Row(a.seq_id, a.sampling, left=a.max_new))
        prefix = a.prefix
        if prefix is not None and prefix.num_tokens:
            try:
                if self.layout is not None and not self.layout.fits(prefix):
                    raise ValueError("its KV does not have the model's layout")
                p.cache = [restore(k, v, prefix.dtype) for k, v in prefix.layers]
                mx.eval([(c.keys, c.values) for c in p.cache])
                p.done, p.hit = prefix.num_tokens, True
            except Exception as exc:
                self._cold(p, exc)
        return p

    def _guarded(self, group: list[_Prefill], work: Callable[[], dict[int, int]]) -> dict[int, int]:
        """`work`, prefill for `group`. If it fails with a cached prefix in the group, before the
        group joins the decode batch, the prefix is blamed, not the batch: a row alone restarts
        cold; a group's rows each retry alone."""
        self._joining = False
        if not any(p.hit for p in group):
            return work()
        try:
            return work()
        except Exception as exc:
            if self._joining:  # the decode batch may be half changed: the engine starts a new one
                raise
            if len(group) > 1:
                for p in group:
                    p.alone = True
            else:
                self._cold(group[0], exc)
            return {}

    def _cold(self, p: _Prefill, exc: Exception) -> None:
        log.warning("sequence %d: its cached prefix cannot be used (%s: %s); prefilled from scratch",
                    p.admission.seq_id, type(exc).__name__, exc)
        p.cache, p.done, p.hit = None, 0, False
        self.rejected.add(p.admission.seq_id)

    def _release(self, ids: set[int], keep: set[int]) -> dict[int, KVData]:
        self.prefills = [p for p in self.prefills if p.admission.seq_id not in ids]
        d = self.decoding
        kept = {row.seq_id: snapshot(d.cache, i) for i, row in enumerate(d.rows) if row.seq_id in keep}
        rest = [i for i, row in enumerate(d.rows) if row.seq_id not in ids]
        if len(rest) == len(d.rows):
            return kept
        if not rest:
            self.decoding = _Decoding()
            return kept
        d.rows = [d.rows[i] for i in rest]
        index = mx.array(rest)
        for c in d.cache:
            c.filter(rest)
        if len(rest) == 1:
            d.cache = [c.extract(0) for c in d.cache]
        d.inputs = d.inputs[index]
        return kept

    def _decode(self) -> dict[int, list[int]]:
        """Every decoding row's next token(s), all rows in one forward pass (verify.py).

        No one-step-ahead pipelining: measured on the CPU backend, mx.async_eval blocks until the
        step is computed, so running ahead only delayed every token by a step."""
        d = self.decoding
        out, d.inputs = decode(self._forward, d.cache, d.inputs, d.rows, self._sample, self.step_cost)
        return out

    # Prefill ----------------------------------------------------------------------------------

    def _prefill(self) -> dict[int, int]:
        """Prompt work for one step, bounded by the prefill budget.

        Three kinds of work: short fresh prompts (each at most one chunk) are prefilled together as
        a group; prompts resuming from a cached prefix whose rest fits a chunk are finished together
        as another group; a long prompt advances one chunk. The kinds waiting share the budget, so a
        long prompt never holds short or warm requests back for its whole prefill, and still always
        progresses. The budget bounds how long running streams wait; with none running, a group may
        be IDLE_GROUP_FACTOR times larger (one bigger batch is cheaper).
        """
        chunk = self.prefill_chunk
        shorts = [p for p in self.prefills if not p.done and p.remaining <= chunk]
        resumed = [p for p in self.prefills if p.done and p.remaining <= chunk]
        longs = [p for p in self.prefills if p.remaining > chunk]
        share = sum(1 for kind in (shorts, resumed, longs) if kind)
        budget = chunk * (1 if self.decoding.rows else IDLE_GROUP_FACTOR) // share
        out: dict[int, int] = {}
        if shorts:
            out.update(self._prefill_shorts(shorts, budget))
        if resumed:
            out.update(self._prefill_resumed(resumed, budget))
        if longs:
            out.update(self._guarded(longs[:1], lambda: self._prefill_one(longs[0], max(1, chunk // share))))
        return out

    def _prefill_resumed(self, resumed: list[_Prefill], budget: int) -> dict[int, int]:
        """Prompts that continue a cached prefix (or a long prompt's last chunk): the first one and
        as many more as fit `budget` in padded suffix tokens, finished in one batch."""
        group = resumed[:1]
        for p in resumed[1:]:
            longest = max(p.remaining, *(q.remaining for q in group))
            if p.alone or group[0].alone or (len(group) + 1) * longest > budget:
                break
            group.append(p)
        return self._guarded(group, lambda: self._prefill_together(group))

    def _prefill_together(self, group: list[_Prefill]) -> dict[int, int]:
        if len(group) == 1:
            return self._prefill_one(group[0], group[0].remaining)
        layers = range(len(self.model.layers))
        cache = [BatchKVCache.merge([p.cache[i] for p in group]) for i in layers]
        return self._prefill_suffixes(group, cache, [p.admission.prompt_ids[p.done :] for p in group])

    def _prefill_shorts(self, shorts: list[_Prefill], budget: int) -> dict[int, int]:
        """The first short prompt and as many following ones as fit `budget` (grouping.py)."""
        size, shared = short_group([p.admission.prompt_ids for p in shorts], budget)
        group = shorts[:size]
        return self._prefill_shared(group, shared) if shared else self._prefill_group(group)

    def _prefill_one(self, p: _Prefill, chunk: int) -> dict[int, int]:
        """The next `chunk` tokens of a long prompt; on its last chunk it joins the decode batch."""
        if p.cache is None:
            p.cache = [KVCache() for _ in self.model.layers]
        n = min(chunk, p.remaining)
        ids = mx.array([p.admission.prompt_ids[p.done : p.done + n]])
        p.done += n
        if p.remaining:
            self._forward(ids, p.cache, last_logits=False)
            mx.eval([c.state for c in p.cache])
            return {}
        logits = self._forward(ids, p.cache, last_logits=True)
        return self._join([p], p.cache, logits)

    def _prefill_group(self, group: list[_Prefill]) -> dict[int, int]:
        """Short prompts together, left-padded to the longest (the padding is masked out)."""
        prompts = [p.admission.prompt_ids for p in group]
        longest = max(map(len, prompts))
        padding = [longest - len(ids) for ids in prompts]
        tokens = mx.array([[0] * pad + ids for pad, ids in zip(padding, prompts)])
        cache = [BatchKVCache(padding) for _ in self.model.layers]
        logits = self._forward(tokens, cache, last_logits=True)
        return self._join(group, cache, logits)

    def _prefill_shared(self, group: list[_Prefill], shared: int) -> dict[int, int]:
        """Prompts with a common prefix (a system prompt): the prefix once, then the suffixes together."""
        prefix = [KVCache() for _ in self.model.layers]
        self._forward(mx.array([group[0].admission.prompt_ids[:shared]]), prefix, last_logits=False)
        cache = [BatchKVCache.merge([c] * len(group)) for c in prefix]
        return self._prefill_suffixes(group, cache, [p.admission.prompt_ids[shared:] for p in group])

    def _prefill_suffixes(self, group: list[_Prefill], cache: list[Any], suffixes: list[list[int]]) -> dict[int, int]:
        """Each row's remaining prompt on top of its cached part, all rows in one forward pass.

        Suffixes are right-padded so each row continues straight after its own cached tokens; the
        cache's finalize() then rolls the padding to the left, as the decode batch expects.
        """
        longest = max(map(len, suffixes))
        padding = [longest - len(ids) for ids in suffixes]
        for c in cache:
            c.prepare(right_padding=padding)
        tokens = mx.array([ids + [0] * pad for pad, ids in zip(padding, suffixes)])
        last = mx.array([len(ids) - 1 for ids in suffixes])
        logits = self._forward(tokens, cache, last_logits=True, positions=last)
        for c in cache:  # roll only the filled part of the buffer, not its spare capacity
            c.keys, c.values = c.keys[..., : c.size(), :], c.values[..., : c.size(), :]
            c.finalize()
        return self._join(group, cache, logits)

    def _join(self, group: list[_Prefill], cache: list[Any], logits: Any) -> dict[int, int]:
        """Sample each prompt's first token and move the group into the decode batch."""
        if any(p.hit for p in group):  # a failure a cached prefix caused surfaces before anything changes
            mx.eval(logits, [c.state for c in cache])
        self._joining = True
        rows = [p.row for p in group]
        tokens = self._sample(logits, rows)
        d = self.decoding
        if not d.rows:
            single = len(rows) == 1 and isinstance(cache[0], BatchKVCache)
            d.cache = [c.extract(0) if single else RaggedKV.adopt(c) for c in cache]
            d.inputs = tokens
        else:
            d.cache = [RaggedKV.adopt(c) for c in d.cache]
            for mine, theirs in zip(d.cache, cache):
                mine.extend(RaggedKV.adopt(theirs))
            d.inputs = mx.concatenate([d.inputs, tokens])
        d.rows.extend(rows)
        mx.eval([c.state for c in d.cache], d.inputs)
        joined = set(map(id, group))
        self.prefills = [p for p in self.prefills if id(p) not in joined]
        for p, first in zip(group, firsts := tokens.tolist()):
            p.row.start(p.admission.prompt_ids, first, self.max_draft)
        return dict(zip((r.seq_id for r in rows), firsts))

    def _sample(self, logits: Any, rows: list[Row]) -> Any:
        return sample_batch(logits, rows)  # a method: the tests' seam for the logits
