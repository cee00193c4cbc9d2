"""Which decode replica a prompt goes to, and whether it prefills there: the routing rule. No JAX.

Among the live decode replicas that can take the prompt now (its pages, less the cached prefix it would
share there), the one holding its longest cached prefix, unless that replica would be left with fewer than
``CACHE_AFFINITY_LOAD_RATIO`` of the free pages the roomiest candidate would be left with; then the
roomiest. Ties (no hit anywhere included) go to the most free pages left, then the lowest index. A cached
prefix saves its prefill and its hand-off only where it is, so it outweighs load until that replica is
clearly the more loaded one. The prompt prefills on that replica itself when at most
``local_prefill_tokens`` of its tokens are uncached there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from jdisagg.kv_manager import KVManager, PagePool, pages_needed
from jdisagg.prefix_cache import extend_page_keys
from jdisagg.requests import Request
from jdisagg.schedule_types import SchedulerConfig

CACHE_AFFINITY_LOAD_RATIO = 0.5  # a cached prefix wins unless its replica is left with under half the room


@dataclass(frozen=True)
class Placement:
    replica: int
    hit: list[int]  # the cached pages of its prefix there
    local: bool  # prefill it on the decode replica


def place(request: Request, config: SchedulerConfig, kv: KVManager, live: Mapping[int, PagePool]
          ) -> Placement | None:
    """Where ``request`` prefills and decodes among the ``live`` replicas' pools; None: none has the pages
    now. The cached prefix is capped so that at least one token is computed."""
    page_size = config.page_size
    length = len(request.all_ids)
    total = pages_needed(length + 1, page_size)
    keys = []
    if config.prefix_cache:
        keys = extend_page_keys(request.page_keys, request.all_ids, page_size)
        keys = keys[: (length - 1) // page_size]
    options = []  # (pages left after taking it, replica, hit)
    for index, pool in live.items():
        hit = kv.lookup(index, keys) if keys else []
        left = pool.free - pool.evictable_among(hit) - (total - len(hit))
        if left >= 0:
            options.append((left, index, hit))
    if not options:
        return None
    roomiest = max(options, key=lambda o: (o[0], -o[1]))
    left, index, hit = max(options, key=lambda o: (len(o[2]), o[0], -o[1]))
    if left < CACHE_AFFINITY_LOAD_RATIO * roomiest[0]:
        left, index, hit = roomiest
    uncached = length - len(hit) * page_size
    return Placement(index, hit, config.prefills_locally and uncached <= config.local_prefill_tokens)
