"""Page accounting for every decode replica: which pages are free, and which request holds which.

Pages are the unit of KV memory on a decode replica (``page_size`` tokens of every layer). The device pools
live on the replicas; *who owns which page* lives here, in one place, on the host: the scheduler allocates
pages for a prompt before its KV exists, grows them as a sequence decodes, and frees a request's pages in
one call whatever stage it ended in. Nothing else hands out or returns pages, so "used pages equal the live
requests' pages" is a property of this class (``check``) that tests verify after every event.

Pages carry reference counts so a page can have several holders (shared prefix pages). With the prefix cache,
a full page whose KV is written can be *cached* under the chained key of its tokens
(``jdisagg.prefix_cache``): a later prompt with the same tokens up to that page holds it too instead of
computing it again. A cached page whose last holder lets go is not free but *evictable*: it keeps its KV
until an allocation finds no free page and takes it, least recently released first. So the pages of a
replica are always exactly one of free, evictable, or held; ``free`` counts what an allocation can take
(free and evictable) and ``used`` the held pages. Pure Python, no JAX.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

from jdisagg.prefix_cache import PageIndex, PageKey

SCRATCH_PAGE = 0  # never handed out: padded batch slots and padded prompt pages write there


class OutOfPages(Exception):
    """Not enough free pages; the caller waits or preempts."""


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class PagePool:
    """Free list, reference counts and cached pages of one replica (page 0, the scratch page, excluded)."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is scratch), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # popped from the end: low ids first
        self._refs: dict[int, int] = {}
        self.index = PageIndex()
        self.evictions = 0  # cached pages taken by allocations, ever

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    @property
    def free(self) -> int:
        """Pages an allocation can take now: the free ones and the evictable cached ones."""
        return len(self._free) + self.index.evictable

    @property
    def used(self) -> int:
        """Pages with at least one holder."""
        return len(self._refs)

    @property
    def cached(self) -> int:
        return len(self.index)

    @property
    def shared(self) -> int:
        """Pages with more than one holder."""
        return sum(refs > 1 for refs in self._refs.values())

    def evictable_among(self, pages: Iterable[int]) -> int:
        """How many of ``pages`` are evictable (holding them takes them out of ``free``)."""
        return sum(self.index.is_evictable(page) for page in pages)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh pages (one reference each), evicting cached pages when the free ones run out, or
        ``OutOfPages``; never a partial allocation."""
        if n > self.free:
            raise OutOfPages(f"need {n} pages, {self.free} free")
        pages = [self._free.pop() for _ in range(min(n, len(self._free)))]
        while len(pages) < n:
            pages.append(self.index.evict())
            self.evictions += 1
        for page in pages:
            self._refs[page] = 1
        return pages

    def share(self, pages: Iterable[int]) -> None:
        """One more holder of pages in use, or of evictable cached pages (which are then held again)."""
        for page in pages:
            if page in self._refs:
                self._refs[page] += 1
            elif self.index.is_evictable(page):
                self.index.held(page)
                self._refs[page] = 1
            else:
                raise AssertionError(f"page {page} is free: it cannot be shared")

    def release(self, pages: Iterable[int]) -> None:
        """Drop one reference of each page; a page without holders is free again, or evictable if cached."""
        for page in pages:
            refs = self._refs.get(page, 0)
            if refs == 0:
                raise AssertionError(f"page {page} released twice")
            if refs > 1:
                self._refs[page] = refs - 1
                continue
            del self._refs[page]
            if self.index.is_cached(page):
                self.index.unheld(page)
            else:
                self._free.append(page)

    def cache(self, pages: Sequence[int], keys: Sequence[PageKey]) -> None:
        """Cache held ``pages`` (their KV is written) under ``keys``; a page or key already cached is left."""
        for page, key in zip(pages, keys, strict=True):
            if page not in self._refs:
                raise AssertionError(f"page {page} is not held: its KV cannot be cached")
            self.index.add(page, key)

    def clear_cache(self) -> None:
        """Forget every cached page (the pools were reset): evictable ones are free, held ones plain."""
        self._free.extend(self.index.clear())

    def refs(self, page: int) -> int:
        return self._refs.get(page, 0)

    def check(self) -> None:
        """Every page is exactly one of free, evictable or held, and the index is consistent."""
        free = set(self._free)
        if len(free) != len(self._free) or free & set(self._refs) or any(map(self.index.is_cached, free)):
            raise AssertionError("a free page is listed twice, held or cached")
        self.index.check(self._refs)
        if len(self._free) + self.index.evictable + len(self._refs) != self.capacity:
            raise AssertionError(
                f"{len(self._free)} free + {self.index.evictable} evictable + {len(self._refs)} held pages "
                f"!= {self.capacity}"
            )


class KVManager:
    """The pages of every decode replica and the map holder -> (replica, pages)."""

    def __init__(self, pages_per_replica: Mapping[int, int]) -> None:
        self.pools = {index: PagePool(n) for index, n in pages_per_replica.items()}
        self._held: dict[Hashable, tuple[int, list[int]]] = {}

    def allocate(self, holder: Hashable, replica: int, n: int) -> list[int]:
        """``n`` more pages for ``holder`` on ``replica`` (a holder keeps all its pages on one replica)."""
        where, pages = self._held.get(holder, (replica, []))
        if where != replica:
            raise AssertionError(f"{holder!r} holds pages on replica {where}, not {replica}")
        new = self.pools[replica].allocate(n)
        self._held[holder] = (replica, pages + new)
        return new

    def share(self, holder: Hashable, replica: int, pages: list[int]) -> None:
        """``holder`` holds ``pages`` (in use by another holder) too, after the ones it already has."""
        where, held = self._held.get(holder, (replica, []))
        if where != replica:
            raise AssertionError(f"{holder!r} holds pages on replica {where}, not {replica}")
        self.pools[replica].share(pages)
        self._held[holder] = (replica, held + list(pages))

    def pages(self, holder: Hashable) -> list[int]:
        return self._held.get(holder, (0, []))[1]

    def replica_of(self, holder: Hashable) -> int | None:
        held = self._held.get(holder)
        return None if held is None else held[0]

    def free(self, holder: Hashable) -> int:
        """Release everything ``holder`` holds; the number of pages it held. Last page first, so that of a
        sequence's cached pages the later ones are evicted before the prefix others are likelier to share."""
        held = self._held.pop(holder, None)
        if held is None:
            return 0
        replica, pages = held
        self.pools[replica].release(reversed(pages))
        return len(pages)

    def free_pages(self, replica: int) -> int:
        return self.pools[replica].free

    def lookup(self, replica: int, keys: Sequence[PageKey]) -> list[int]:
        """The cached pages on ``replica`` of the longest prefix of ``keys``."""
        return self.pools[replica].index.lookup(keys)

    def cache(self, holder: Hashable, keys: Sequence[PageKey]) -> None:
        """Cache ``holder``'s first ``len(keys)`` pages under ``keys`` (their KV is written)."""
        replica, pages = self._held[holder]
        self.pools[replica].cache(pages[: len(keys)], keys)

    def clear_cache(self, replica: int) -> None:
        self.pools[replica].clear_cache()

    def check(self) -> None:
        """The invariant: every used page is held, as many times as its reference count says; every page is
        exactly one of free, evictable or held."""
        for pool in self.pools.values():
            pool.check()
        counts: dict[tuple[int, int], int] = {}
        for replica, pages in self._held.values():
            for page in pages:
                counts[replica, page] = counts.get((replica, page), 0) + 1
        for index, pool in self.pools.items():
            held = {page: n for (r, page), n in counts.items() if r == index}
            if len(held) != pool.used:
                raise AssertionError(f"replica {index}: {pool.used} pages used, {len(held)} held")
            for page, n in held.items():
                if pool.refs(page) != n:
                    raise AssertionError(f"replica {index} page {page}: {pool.refs(page)} refs, {n} holders")
