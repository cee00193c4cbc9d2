"""The serving sizes every replica compiles for, derived once and checked against the model.

The context defaults to the model's own (``max_position_embeddings``): prompts longer than the prefill
chunk are prefilled chunk by chunk (``jdisagg.chunked_prefill``), so a long context costs neither a
``T x T`` score matrix nor a prefill program per power of two. ``jdisagg.memory.plan_kv_pages`` lowers a
defaulted context to what the KV budget holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from jdisagg.buckets import power_of_two_buckets
from jdisagg.models.config import ModelConfig

DEFAULT_PREFILL_CHUNK = 512  # tokens; a chunk scores 512 x 512 keys at a time: 1 MiB of float32 per head
# With the model's own context (possibly 128k) and no KV budget (CPU), each batch slot gets this many tokens
# of pages and one sequence the full context, instead of every slot a full context.
DEFAULT_SLOT_TOKENS = 1024
# A defaulted context is lowered to what the KV cache holds, but not below this (or the model's own): a
# server whose context silently shrank to a few pages would refuse most prompts, so it refuses to start.
MIN_FITTED_CONTEXT = 1024

log = logging.getLogger("jdisagg.sizes")


@dataclass(frozen=True)
class ServingSizes:
    page_size: int  # tokens per KV page
    max_batch: int  # sequences per decode replica and step
    max_context: int  # longest sequence (prompt + output)
    num_pages: int  # pages per decode replica, page 0 (scratch) included
    max_prefill_batch: int = 16  # prompts per prefill call (``PrefillExecutor.run_batch``)
    prefill_token_budget: int = 2048  # prompt tokens per prefill call; a longer prompt runs alone
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # a longer prompt is prefilled in chunks of this many tokens
    context_from_model: bool = False  # max_context was not given: the KV plan may lower it to what fits

    def __post_init__(self) -> None:
        if self.chunked and self.chunk % self.page_size:
            raise ValueError(f"prefill_chunk={self.prefill_chunk} must be a multiple of page_size="
                             f"{self.page_size}: a chunk's KV is inserted as whole pages")

    @property
    def chunk(self) -> int:
        """Tokens per prefill chunk; prompts up to this many run one bucketed program (at most the context,
        at least a page)."""
        return min(max(self.prefill_chunk, self.page_size), self.max_context)

    @property
    def chunked(self) -> bool:
        """Whether a prompt can exceed one chunk (then the chunk program and its buffer are compiled)."""
        return self.max_context > self.chunk

    @property
    def chunk_capacity(self) -> int:
        """Tokens of a long prompt's per-call KV buffer: the context, rounded up to whole chunks."""
        return -(-self.max_context // self.chunk) * self.chunk

    @property
    def max_pages(self) -> int:
        return self.max_context // self.page_size

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """Prompt lengths prefill (and insert) compile for: powers of two up to the chunk length. A longer
        prompt runs in chunks, whose KV pieces the decode side inserts with the largest of these."""
        return power_of_two_buckets(min(max(self.page_size, 16), self.chunk), self.chunk)

    @property
    def prefill_call_prompts(self) -> int:
        """Most prompts in one prefill call: ``max_prefill_batch``, but no more than a decode step holds
        (``max_batch``): prompts prefilled beyond that would only wait for a decode row."""
        return max(1, min(self.max_prefill_batch, self.max_batch))

    @property
    def prefill_batch_sizes(self) -> tuple[int, ...]:
        """Prompts per batched prefill call: ``prefill_call_prompts`` and half of it (at least 2), so a burst
        of a quarter of it or more fills a call at least half (``buckets.plan_prefill_calls``) for two
        programs per length. Empty when calls hold one prompt: every prompt runs on its own."""
        top = self.prefill_call_prompts
        return tuple(sorted({max(2, top // 2), top})) if top > 1 else ()

    @property
    def batched_prefill(self) -> dict[int, tuple[int, ...]]:
        """The ``prefill[B, T]`` programs, as the batch sizes B per prompt-length bucket T: those whose B x T
        fits the prefill token budget."""
        shapes = {t: tuple(b for b in self.prefill_batch_sizes if b * t <= self.prefill_token_budget)
                  for t in self.prefill_buckets}
        return {t: sizes for t, sizes in shapes.items() if sizes}

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
    """Fill in defaults and refuse sizes that cannot work (``ValueError`` with the reason).

    ``max_context`` defaults to the model's positions (rounded down to whole pages). ``num_pages`` defaults
    to every batch slot holding a full context when ``max_context`` is given; with the model's context it
    is ``max_batch`` slots of ``DEFAULT_SLOT_TOKENS`` and at least one full context, so a 128k-position
    model does not default to eight 128k sequences of KV (on GPU/TPU the memory plan replaces it anyway).
    """
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    from_model = not max_context
    max_context = max_context or config.max_position_embeddings // page_size * page_size
    if max_context < page_size or max_context % page_size or max_context > config.max_position_embeddings:
        raise ValueError(
            f"max_context={max_context} must be a multiple of page_size={page_size} and at most the "
            f"model's {config.max_position_embeddings} positions"
        )
    max_pages = max_context // page_size
    slot_pages = min(max_pages, max(1, DEFAULT_SLOT_TOKENS // page_size)) if from_model else max_pages
    num_pages = num_pages or max(max_batch * slot_pages, max_pages) + 1
    if num_pages - 1 < max_pages:
        fitted = fitted_context(max_context, num_pages - 1, page_size) if from_model else None
        if fitted is None:
            raise ValueError(
                f"num_pages={num_pages} cannot hold one full context ({max_pages} pages + 1 scratch page)"
            )
        log.warning("max_context %d (the model's) lowered to %d: num_pages=%d holds no more",
                    max_context, fitted, num_pages)
        max_context = fitted
    return ServingSizes(page_size, max_batch, max_context, num_pages, context_from_model=from_model)


def fitted_context(max_context: int, pages: int, page_size: int) -> int | None:
    """The longest context ``pages`` (scratch page not counted) hold one sequence of, when it is below
    ``max_context`` but at least ``MIN_FITTED_CONTEXT`` (or ``max_context`` itself, if smaller); else None."""
    fitted = min(pages * page_size, max_context)
    return fitted if fitted >= min(MIN_FITTED_CONTEXT, max_context) else None
