"""Which ``kv_window`` programs a prefill replica compiles for the suffix-only hand-off: exactly the shapes
some prompt can ask for, found by enumerating every prompt length and cached prefix (pure Python, no
devices). The programs' outputs are checked against the full hand-off in tests/test_local_prefill.py."""

from __future__ import annotations

import pytest

from jdisagg.buckets import bucket_for, power_of_two_buckets
from jdisagg.kv_suffix import plan_cuts, window_signatures


def _positions(cuts, length: int, cached: int, buckets: tuple[int, ...]) -> list[int]:
    """The prompt positions the cut pieces hold, laid end to end (-1 for padding)."""
    chunk = buckets[-1]
    held = []
    for cut in cuts:
        size = chunk if cut.signature is None else cut.signature[2]
        start = cut.first * (chunk if length > chunk else 0) + cut.offset
        held += [p if p < length else -1 for p in range(start, start + size)]
    return held


@pytest.mark.parametrize(("page_size", "smallest", "chunk", "context"), [
    (16, 16, 128, 128),  # one bucket holds every prompt: no chunk pieces
    (16, 16, 64, 256),  # chunked prompts, the smallest bucket one page
    (8, 16, 64, 200),  # pages smaller than the smallest bucket
])
def test_compiled_windows_are_exactly_the_ones_prompts_need(page_size, smallest, chunk, context):
    buckets = power_of_two_buckets(smallest, chunk)
    needed = set()
    for length in range(1, context + 1):
        for cached in range(page_size, length, page_size):
            cuts = plan_cuts(length, cached, buckets)
            needed |= {cut.signature for cut in cuts if cut.signature is not None}
            held = _positions(cuts, length, cached, buckets)
            real = [p for p in held if p >= 0]
            assert real == list(range(cached, length)), (length, cached)
            assert held[: len(real)] == real  # padding only at the end, as insert expects
            assert len(held) == (len(cuts) - 1) * chunk + bucket_for(len(real) - (len(cuts) - 1) * chunk,
                                                                     buckets)
    compiled = window_signatures(buckets, page_size, chunked=context > chunk)
    assert len(compiled) == len(set(compiled))
    assert set(compiled) == needed


def test_the_default_buckets_compile_fewer_windows_than_every_pair():
    """16..512-token buckets and 16-token pages: 19 one-part windows instead of all 21 pairs with S <= T,
    and 5 over two chunk pieces instead of 6."""
    buckets = power_of_two_buckets(16, 512)
    signatures = window_signatures(buckets, 16, chunked=True)
    assert sum(parts == 1 for parts, _, _ in signatures) == 19
    assert sum(parts == 2 for parts, _, _ in signatures) == 5
