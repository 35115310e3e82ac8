"""The engine's interface, free of MLX: what the scheduler hands the engine and gets back.

Everything above the engine (scheduler, service, tests with a fake engine) imports these types from
here, so importing them never loads `mlx.core`; only `engine/engine.py` and the modules it runs on
the MLX thread do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, NamedTuple, Protocol

from semcache.cache.kvdata import KVData
from semcache.cache.layout import KVLayout

__all__ = ["Admission", "Engine", "ModelInfo", "SamplingParams", "StepResult"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # grammar.Constraint: this sequence's own grammar state (tool_choice, response_format); only
    # tokens it allows are sampled. One per sequence: it advances with every sampled token.
    constraint: Any = field(default=None, compare=False)

    @classmethod
    def from_request(cls, temperature: float | None, top_p: float | None, top_k: int | None,
                     seed: int | None = None) -> "SamplingParams":
        """Unset fields keep the defaults above; top_k <= 0 (vLLM's -1 included) means no top-k."""
        return cls(
            temperature=cls.temperature if temperature is None else temperature,
            top_p=cls.top_p if top_p is None else top_p,
            top_k=max(0, top_k or 0),
            seed=seed,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass(frozen=True)
class Admission:
    """A sequence the scheduler hands the engine: prefill these ids, then decode with `sampling`."""

    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    prefix: KVData | None = None  # a cache hit: KV of the first prefix.num_tokens prompt ids
    max_new: int | None = None  # tokens it may still generate (speculation drafts no further); None: unbounded


class StepResult(NamedTuple):
    tokens: dict[int, int]  # seq_id -> the token it sampled this step
    kept: dict[int, KVData]  # seq_id -> KV of a released sequence that asked to keep it
    # seq_ids whose cached prefix the engine could not use: they are prefilled from scratch instead
    rejected: frozenset[int] = frozenset()
    # Speculative decoding: seq_id -> the tokens it kept after `tokens[seq_id]` this step, in order
    more: dict[int, list[int]] = {}
    # seq_id -> (tokens drafted, tokens of the draft accepted), for each row that drafted this step
    verified: dict[int, tuple[int, int]] = {}


@dataclass(frozen=True)
class ModelInfo:
    """What layers above the engine may know about the model."""

    model_id: str
    context_length: int
    eos_token_ids: frozenset[int]
    kv_bytes_per_token: int
    path: str = ""
    backend: str = "cpu"
    dtype: str = "float32"
    nbytes: int = 0
    fingerprint: str = ""
    kv_layout: KVLayout | None = None  # per layer KV heads and head dims, and dtype (None: unknown)


class Engine(Protocol):
    info: ModelInfo | None
    tokenizer: Any

    async def load(self) -> None:
        """Load model and tokenizer (on the engine's own thread); sets `info` and `tokenizer`."""

    async def step(self, admit: list[Admission], release: list[int], keep: Collection[int] = ()) -> StepResult:
        """Drop `release` (returning the KV of those in `keep`), take in `admit` (starting from
        their cached prefix), and advance everything one step."""

    async def prepare(self, model_spec: str) -> Any:
        """Load another model without putting it in place; the result has its `info`. On failure,
        or if cancelled, the current model stays (a cancelled load's result is dropped)."""

    def install(self, prepared: Any) -> None:
        """Put a prepared model in place at once: `info`, `tokenizer` and the model change together
        (nothing may be running)."""

    async def close(self) -> None:
        """Free the model and stop the engine thread."""
