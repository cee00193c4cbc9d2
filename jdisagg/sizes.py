"""The serving sizes every replica compiles for, derived once and checked against the model."""

from __future__ import annotations

from dataclasses import dataclass

from jdisagg.models.config import ModelConfig
from jdisagg.programs import power_of_two_buckets


@dataclass(frozen=True)
class ServingSizes:
    page_size: int  # tokens per KV page
    max_batch: int  # sequences per decode replica and step
    max_context: int  # longest sequence (prompt + output)
    num_pages: int  # pages per decode replica, page 0 (scratch) included
    max_prefill_batch: int = 8  # prompts per prefill call (``PrefillExecutor.run_batch``)
    prefill_token_budget: int = 2048  # prompt tokens per prefill call; a longer prompt runs alone

    @property
    def max_pages(self) -> int:
        return self.max_context // self.page_size

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """Prompt lengths prefill (and insert) compile for."""
        return power_of_two_buckets(max(self.page_size, 16), self.max_context)

    @property
    def batched_prefill_buckets(self) -> tuple[int, ...]:
        """Prompt lengths that also get a ``prefill[max_prefill_batch, T]`` program: those whose full batch
        fits the prefill token budget (none when ``max_prefill_batch`` is 1)."""
        if self.max_prefill_batch < 2:
            return ()
        budget = self.prefill_token_budget
        return tuple(t for t in self.prefill_buckets if self.max_prefill_batch * t <= budget)

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        return power_of_two_buckets(1, self.max_batch)

    @property
    def page_buckets(self) -> tuple[int, ...]:
        """Page-table widths decode compiles for: a step attends over the smallest width that holds its
        longest sequence, so its cost follows the live context, not ``max_context``. Powers of two from
        256 tokens: at most 2x the live pages are read, for log2(max_context / 256) + 1 programs per batch
        bucket (8 up to 32k tokens)."""
        return power_of_two_buckets(min(self.max_pages, max(1, 256 // self.page_size)), self.max_pages)


def plan_sizes(
    config: ModelConfig, *, page_size: int, max_batch: int, max_context: int | None, num_pages: int | None
) -> ServingSizes:
    """Fill in defaults and refuse sizes that cannot work (``ValueError`` with the reason)."""
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    max_context = max_context or min(config.max_position_embeddings, 1024)
    if max_context % page_size or max_context > config.max_position_embeddings:
        raise ValueError(
            f"max_context={max_context} must be a multiple of page_size={page_size} and at most the "
            f"model's {config.max_position_embeddings} positions"
        )
    max_pages = max_context // page_size
    num_pages = num_pages or max_batch * max_pages + 1
    if num_pages - 1 < max_pages:
        raise ValueError(
            f"num_pages={num_pages} cannot hold one full context ({max_pages} pages + 1 scratch page)"
        )
    return ServingSizes(page_size, max_batch, max_context, num_pages)
