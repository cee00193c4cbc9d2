"""Shape buckets, and how prompts are grouped into prefill calls: the arithmetic every compiled program's
shape comes from. Pure Python, no JAX, so the grouping is unit-tested in milliseconds."""

from __future__ import annotations

from collections.abc import Sequence


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


def plan_prefill_calls(
    lengths: Sequence[int], buckets: tuple[int, ...], batched_buckets: tuple[int, ...], batch: int
) -> list[list[int]]:
    """Indices of the prompts of ``lengths`` grouped into prefill calls, longest bucket first: a group of
    several is one ``prefill[batch, T]`` call of prompts of bucket T, a group of one runs on its own.

    Prompts share a call only with their own bucket, so each one's KV hand-off keeps its own length. Up to
    ``batch`` of them share a call when its ``batch`` rows cost at most ``MAX_BATCH_PADDING`` times theirs
    (a call at least half full); otherwise they run one by one. Fewer calls save launches, but on a
    compute-bound device (a CPU) a padding row costs what a real one does, so the saving must not buy
    unbounded extra work: 2x is what the power-of-two length buckets already accept. Many waiting prompts
    fill whole calls anyway.
    """
    def own_bucket(n: int) -> int | None:
        return bucket_for(n, buckets) if n <= buckets[-1] else None  # longer: chunked or refused alone

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    calls = []
    while order:
        bucket = own_bucket(lengths[order[0]])
        window = [i for i in order[:batch] if own_bucket(lengths[i]) == bucket]
        if len(window) > 1 and bucket in batched_buckets and batch <= MAX_BATCH_PADDING * len(window):
            calls.append(window)
        else:
            window = window[:1]
            calls.append(window)
        order = order[len(window):]
    return calls
