"""Page accounting for every decode replica: which pages are free, and which request holds which.

Pages are the unit of KV memory on a decode replica (``page_size`` tokens of every layer). The device pools
live on the replicas; *who owns which page* lives here, in one place, on the host: the scheduler allocates
pages for a prompt before its KV exists, grows them as a sequence decodes, and frees a request's pages in
one call whatever stage it ended in. Nothing else hands out or returns pages, so "used pages equal the live
requests' pages" is a property of this class (``check``) that tests verify after every event.

Pages carry reference counts so a page can have several holders (shared prefix pages); a page returns to the
free list when its last holder lets go. Pure Python, no JAX.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping

SCRATCH_PAGE = 0  # never handed out: padded batch slots and padded prompt pages write there


class OutOfPages(Exception):
    """Not enough free pages; the caller waits or preempts."""


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class PagePool:
    """Free list and reference counts of one replica's pages (page 0, the scratch page, excluded)."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is scratch), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # popped from the end: low ids first
        self._refs: dict[int, int] = {}

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh pages (one reference each) or ``OutOfPages``; never a partial allocation."""
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for page in pages:
            self._refs[page] = 1
        return pages

    def share(self, pages: Iterable[int]) -> None:
        """One more holder of pages already in use."""
        for page in pages:
            if page not in self._refs:
                raise AssertionError(f"page {page} is free: it cannot be shared")
            self._refs[page] += 1

    def release(self, pages: Iterable[int]) -> None:
        """Drop one reference of each page; a page without holders is free again."""
        for page in pages:
            refs = self._refs.get(page, 0)
            if refs == 0:
                raise AssertionError(f"page {page} released twice")
            if refs == 1:
                del self._refs[page]
                self._free.append(page)
            else:
                self._refs[page] = refs - 1

    def refs(self, page: int) -> int:
        return self._refs.get(page, 0)


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
        """Release everything ``holder`` holds; the number of pages it held."""
        held = self._held.pop(holder, None)
        if held is None:
            return 0
        replica, pages = held
        self.pools[replica].release(pages)
        return len(pages)

    def free_pages(self, replica: int) -> int:
        return self.pools[replica].free

    def check(self) -> None:
        """The invariant: every used page is held, as many times as its reference count says."""
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
