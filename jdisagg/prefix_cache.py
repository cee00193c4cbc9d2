"""Keys of full KV pages, and the index of one replica's cached pages.

A full page's KV depends on every token before it, not only its own, so a page is keyed by a *chained*
hash: the key of the page before it and the page's own tokens. Two sequences share a page key exactly when
they share every token up to the end of that page, so the longest cached prefix of a prompt is the longest
run of its page keys, from the first, that the index holds. SHA-256 rather than Python's ``hash``: a key
collision would silently serve another prompt's KV, so the key must be collision-free in practice, and a
page's 16 or so tokens hash in about a microsecond. Pure Python, no JAX.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from collections.abc import Iterable, Sequence

PageKey = bytes


def extend_page_keys(keys: list[PageKey], tokens: Sequence[int], page_size: int) -> list[PageKey]:
    """Append to ``keys`` the chained keys of the full pages of ``tokens`` it does not cover yet (``keys``
    are those of the first pages of the same tokens). Returns ``keys``."""
    for page in range(len(keys), len(tokens) // page_size):
        digest = hashlib.sha256(keys[-1] if keys else b"")
        digest.update(array("q", tokens[page * page_size : (page + 1) * page_size]).tobytes())
        keys.append(digest.digest())
    return keys


class PageIndex:
    """Which page holds the KV of which key on one replica, and which cached pages nobody holds.

    A cached page nobody holds is *evictable*: it keeps its KV for a later hit, but an allocation that
    finds no free page takes it, least recently released first.
    """

    def __init__(self) -> None:
        self._page_of: dict[PageKey, int] = {}
        self._key_of: dict[int, PageKey] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._page_of)

    @property
    def evictable(self) -> int:
        return len(self._evictable)

    def is_cached(self, page: int) -> bool:
        return page in self._key_of

    def is_evictable(self, page: int) -> bool:
        return page in self._evictable

    def lookup(self, keys: Iterable[PageKey]) -> list[int]:
        """The pages of the longest prefix of ``keys`` in the index."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def add(self, page: int, key: PageKey) -> bool:
        """Cache ``page`` under ``key``; False (and nothing changes) if the key or the page is cached."""
        if key in self._page_of or page in self._key_of:
            return False
        self._page_of[key], self._key_of[page] = page, key
        return True

    def unheld(self, page: int) -> None:
        """The cached ``page`` lost its last holder: it becomes the most recently released evictable."""
        self._evictable[page] = None

    def held(self, page: int) -> None:
        """The evictable ``page`` has a holder again."""
        del self._evictable[page]

    def evict(self) -> int:
        """Forget the least recently released evictable page and return it."""
        page, _ = self._evictable.popitem(last=False)
        del self._page_of[self._key_of.pop(page)]
        return page

    def clear(self) -> list[int]:
        """Forget every key; the pages that were evictable (now simply free)."""
        evictable = list(self._evictable)
        self._page_of.clear()
        self._key_of.clear()
        self._evictable.clear()
        return evictable

    def check(self, refs: dict[int, int]) -> None:
        """Keys and pages map one to one; exactly the cached pages without holders are evictable."""
        if len(self._page_of) != len(self._key_of) or any(
            self._key_of.get(page) != key for key, page in self._page_of.items()
        ):
            raise AssertionError("page index: keys and pages do not map one to one")
        unheld = {page for page in self._key_of if refs.get(page, 0) == 0}
        if unheld != set(self._evictable):
            raise AssertionError(f"page index: evictable {sorted(self._evictable)}, unheld {sorted(unheld)}")
