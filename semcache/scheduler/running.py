"""The running side of the scheduler: sequences in the batch, their text, and how each one ends.

Each sampled token becomes text on its sequence's event queue (incremental detokenizer, stop
strings). A sequence that ends leaves at once, so its slot and KV reservation are free for the
next admission; it is queued for release from the engine's batch at the next step, with its KV
kept for the agent cache unless it failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from semcache.text.chat import Detokenizer, StopMatcher
from semcache.cache.kvdata import KVData
from semcache.engine.types import ModelInfo, StepResult
from semcache.ops.metrics import Metrics
from semcache.scheduler.sequence import Finished, FinishReason, Sequence, Status


@dataclass(eq=False)
class _TextState:
    """Per running sequence text state: detokenizer and stop-string matcher."""

    detok: Detokenizer
    stops: StopMatcher


class Running:
    """Sequences in the batch by id, their KV reservations, and the ended ones not yet released."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float], stream_buffer: int, keep_kv: bool):
        self.metrics = metrics
        self.clock = clock
        self.stream_buffer = stream_buffer
        self.keep_kv = keep_kv  # an agent cache takes the KV of sequences that end
        self.seqs: dict[int, Sequence] = {}
        self.kv_reserved = 0
        self.release: list[int] = []  # ended since the last step: the engine drops them next step
        self.keep: dict[int, Sequence] = {}  # of those, the ones whose KV the engine hands back
        self._kv: dict[int, int] = {}
        self._text: dict[int, _TextState] = {}

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence, kv_tokens: int, kv_bytes: int, tokenizer: Any) -> None:
        """`seq` joins the batch (its caller is told it is admitted), holding `kv_tokens` of KV. A
        preempted sequence that resumes keeps its text state and its first admission's figures."""
        seq.status = Status.RUNNING
        if seq.seq_id not in self._text:
            seq.admitted_at = self.clock()
            self.metrics.queue_wait.observe(seq.admitted_at - seq.arrival)
            self.metrics.prompt_tokens.inc(seq.num_prompt_tokens)
            self._text[seq.seq_id] = _TextState(Detokenizer(tokenizer), StopMatcher(seq.stop))
        self.seqs[seq.seq_id] = seq
        seq.kv_tokens = kv_tokens
        self._kv[seq.seq_id] = kv_bytes
        self.kv_reserved += kv_bytes
        self.metrics.active.set(len(self.seqs))
        if not seq.admitted.done():
            seq.admitted.set_result(None)

    def on_token(self, seq: Sequence, token: int, info: ModelInfo) -> None:
        """Route one sampled token: text to the sequence, or its end (EOS, stop, length, context)."""
        now = self.clock()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
        elif seq.last_token_at is not None:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if seq.max_tokens <= 0:
            return self.end(seq, Finished(FinishReason.LENGTH))
        seq.output_ids.append(token)
        text = self._text[seq.seq_id]
        if token in info.eos_token_ids:
            return self.end(seq, Finished(FinishReason.END))
        delta, stop = text.stops.feed(text.detok.add(token))
        _emit(seq, delta)
        if stop is not None:
            return self.end(seq, Finished(FinishReason.STOP_SEQUENCE, stop_sequence=stop))
        if seq.num_output_tokens >= seq.max_tokens:
            return self.end(seq, Finished(FinishReason.LENGTH))
        if seq.num_prompt_tokens + seq.num_output_tokens >= info.context_length:
            return self.end(seq, Finished(FinishReason.CONTEXT_WINDOW))
        if seq.events.qsize() > self.stream_buffer:
            self.end(seq, Finished(FinishReason.ERROR, error="the client is reading too slowly"))

    def route(self, result: StepResult, info: ModelInfo) -> None:
        """A step's tokens to their sequences: each row's first, then the ones speculation kept
        after it, until the sequence ends (the rest of a verified run past an end is dropped)."""
        for seq_id, token in result.tokens.items():
            seq = self.seqs.get(seq_id)
            for t in [token, *result.more.get(seq_id, ())]:
                if seq is None or seq.is_done:
                    break
                self.on_token(seq, t, info)
        for drafted, accepted in result.verified.values():
            self.metrics.drafted_tokens.inc(drafted)
            self.metrics.accepted_tokens.inc(accepted)
            self.metrics.accepted_per_step.observe(accepted)

    def grow(self, seq: Sequence, kv_tokens: int, extra_bytes: int) -> None:
        seq.kv_tokens = kv_tokens
        self._kv[seq.seq_id] += extra_bytes
        self.kv_reserved += extra_bytes

    def preempt(self, seq: Sequence) -> None:
        """Take `seq` out of the batch to free its KV: the engine hands its KV back at the next step
        (for the agent cache, which it resumes from); its text state stays for when it resumes."""
        del self.seqs[seq.seq_id]
        self.kv_reserved -= self._kv.pop(seq.seq_id)
        self.release.append(seq.seq_id)
        if self.keep_kv:
            self.keep[seq.seq_id] = seq
        self.metrics.active.set(len(self.seqs))

    def end(self, seq: Sequence, finished: Finished, status: Status = Status.FINISHED) -> None:
        """End `seq` wherever it is (running, or still waiting): its last text, then `finished`."""
        text = self._text.pop(seq.seq_id, None)
        if text is not None and finished.reason in (FinishReason.END, FinishReason.LENGTH,
                                                    FinishReason.CONTEXT_WINDOW):
            tail, stop = text.stops.feed(text.detok.flush())
            _emit(seq, tail + (text.stops.flush() if stop is None else ""))
        if self.seqs.pop(seq.seq_id, None) is not None:
            self.metrics.duration.observe(self.clock() - seq.arrival)
            self.metrics.generated_tokens.inc(seq.num_output_tokens)
            self.metrics.active.set(len(self.seqs))
            self.kv_reserved -= self._kv.pop(seq.seq_id)
            self.release.append(seq.seq_id)
            if self.keep_kv and finished.reason is not FinishReason.ERROR:
                self.keep[seq.seq_id] = seq
        seq.status = status
        seq.finished = finished
        seq.events.put_nowait(finished)
        if not seq.admitted.done():
            seq.admitted.set_result(None)

    def end_all(self, finished: Finished, status: Status = Status.FINISHED) -> None:
        for seq in list(self.seqs.values()):
            self.end(seq, finished, status)

    def check_integrity(self) -> None:
        assert all(seq.status is Status.RUNNING for seq in self.seqs.values())
        assert set(self.seqs) == set(self._kv) and set(self.seqs) <= set(self._text), "state drifted"
        assert self.kv_reserved == sum(self._kv.values()), "KV reservations drifted"


def _emit(seq: Sequence, delta: str) -> None:
    if delta:
        seq.events.put_nowait(delta)


def kept_tokens(data: KVData | None, tokens: int) -> KVData | None:
    """A released row's KV without what it holds past its sequence's `tokens` (a verified run that
    went on after its end): the agent cache stores exactly the tokens that were kept."""
    if data is None or data.num_tokens <= tokens:
        return data
    return KVData(tuple((k[:, :, :tokens], v[:, :, :tokens]) for k, v in data.layers), data.dtype)
