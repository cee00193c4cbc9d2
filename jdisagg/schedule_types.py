"""What the scheduler is configured with, takes and returns: plain values shared with the stage threads and
tests. No JAX."""

from __future__ import annotations

from dataclasses import dataclass, field

from jdisagg.outputs import FinishReason, TopLogprobs
from jdisagg.requests import Request


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    max_batch: int  # rows per decode step
    max_context: int  # prompt + output tokens
    max_queue: int = 256  # waiting requests before ``add`` refuses
    max_prefill_batch: int = 16  # prompts per prefill call
    prefill_token_budget: int = 2048  # prompt tokens per prefill call (a longer prompt runs alone)
    prefix_cache: bool = False  # reuse the KV of cached full pages on the decode replicas
    local_prefill_tokens: int = 0  # prefill on the decode replica when at most this many tokens are uncached
    local_chunk: int = 0  # most tokens in one local chunk (0: the decode replicas cannot prefill locally)
    step_token_budget: int = 512  # local-prefill tokens run with one decode step

    @property
    def prefills_locally(self) -> bool:
        return self.local_chunk > 0 and self.local_prefill_tokens > 0


@dataclass(frozen=True)
class TokenSample:
    """One sampled token as the host read it."""

    token: int
    logprob: float
    top: TopLogprobs | None = None  # the most likely alternatives, when the request asked for them


@dataclass(frozen=True)
class Emission:
    """Output for a request's stream: new tokens, or its end (``finish`` set)."""

    request: Request
    token_ids: tuple[int, ...] = ()
    finish: FinishReason | None = None
    error: str | None = None


@dataclass(frozen=True)
class ChunkPlan:
    """One piece of a prompt to prefill on its decode replica: the KV of ``all_ids[start:end]``."""

    request: Request
    start: int
    end: int


@dataclass(frozen=True)
class StepPlan:
    rows: list[Request]  # in batch order
    preempted: list[Request]  # freed to make room, back at the front of the queue
    chunks: list[ChunkPlan] = field(default_factory=list)  # local prefill run with the step, one per prompt


@dataclass
class Counters:
    """Totals since the start, for the metrics."""

    queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0  # of those, tokens whose KV was found cached
    local_prefills: int = 0  # prompts scheduled to prefill on their decode replica
    remote_prefills: int = 0  # prompts scheduled to prefill on a prefill replica
    handoff_tokens: int = 0  # prompt tokens whose KV a prefill replica handed off and decode inserted
