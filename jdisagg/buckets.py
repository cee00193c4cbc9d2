"""Shape buckets, and how prompts are grouped into prefill calls: the arithmetic every compiled program's
shape comes from. Pure Python, no JAX, so the grouping is unit-tested in milliseconds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """``smallest, 2*smallest, ...`` up to and including ``largest``."""
    buckets, size = [], smallest
    while size < largest:
        buckets.append(size)
        size *= 2
    buckets.append(largest)
    return tuple(buckets)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    for size in buckets:
        if n <= size:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


MAX_BATCH_PADDING = 2  # a batched prefill call computes at most this many times its prompts' own tokens


class PrefillCall(NamedTuple):
    """One prefill call: ``prompts`` (indices) through ``prefill[rows, T]``, or ``prefill[T]`` when ``rows``
    is 1 (one prompt on its own)."""

    rows: int
    prompts: list[int]


def plan_prefill_calls(
    lengths: Sequence[int], buckets: tuple[int, ...], batched: Mapping[int, tuple[int, ...]]
) -> list[PrefillCall]:
    """The prompts of ``lengths`` grouped into prefill calls, longest bucket first. ``batched`` maps a length
    bucket T to the batch sizes (ascending) it has a ``prefill[B, T]`` program for.

    Prompts share a call only with their own bucket, so each one's KV hand-off keeps its own length. A group
    takes the smallest compiled batch that holds it (the largest, for more prompts than that), when its rows
    cost at most ``MAX_BATCH_PADDING`` times the group's own (a call at least half full); otherwise its
    prompts run one by one. Fewer calls save launches, but on a compute-bound device (a CPU) a padding row
    costs what a real one does, so the saving must not buy unbounded extra work: 2x is what the power-of-two
    length buckets already accept. Many waiting prompts fill whole calls anyway.
    """
    def own_bucket(n: int) -> int | None:
        return bucket_for(n, buckets) if n <= buckets[-1] else None  # longer: chunked or refused alone

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    calls = []
    while order:
        bucket = own_bucket(lengths[order[0]])
        sizes = batched.get(bucket, ()) if bucket is not None else ()
        group = [i for i in order[: max(sizes, default=1)] if own_bucket(lengths[i]) == bucket]
        rows = next((b for b in sizes if b >= len(group)), 1)
        if len(group) > 1 and rows <= MAX_BATCH_PADDING * len(group):
            calls.append(PrefillCall(rows, group))
        else:
            calls.append(PrefillCall(1, group[:1]))
        order = order[len(calls[-1].prompts):]
    return calls
