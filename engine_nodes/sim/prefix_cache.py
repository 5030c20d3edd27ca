"""Paged KV memory with a prefix cache over chained page keys, and LRU eviction.

The pool has ``capacity_pages`` pages of ``page_size`` tokens. A page is in one of three states:

- **free**: holds nothing;
- **private**: owned by one running request (its uncached prompt pages before they are computed,
  and the room it reserved for its output tokens);
- **indexed**: computed prompt KV, findable by its chained key (``tokens.page_keys``), with a
  reference count of the running requests that use it. An indexed page with no reference is
  *evictable*: it still serves hits, but its memory is reclaimed in least-recently-used order when
  a new request needs room.

Matching walks a request's keys from the first and stops at the first miss: because each key hashes
its predecessor, this is the longest cached prefix, exactly what SGLang's radix tree or vLLM's block
hash chain finds (cost: one dict lookup per page). Eviction removes the least recently released page
first; requests release their pages last-to-first, so the leaves of a prefix go before its root, as
in a radix tree's leaf-first LRU.

Usage reported to metrics counts private and referenced pages only. Evictable pages count as free,
as SGLang's ``token_usage`` and vLLM's ``kv_cache_usage_perc`` do.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class CacheStats:
    query_tokens: int = 0  # prompt tokens looked up (vLLM prefix_cache_queries)
    hit_tokens: int = 0  # of those, served from cache (vLLM prefix_cache_hits)
    evicted_pages: int = 0


class PageCache:
    def __init__(self, capacity_pages: int, page_size: int) -> None:
        if capacity_pages < 1:
            raise ValueError("the KV pool needs at least one page")
        self.capacity_pages = capacity_pages
        self.page_size = page_size
        self.free_pages = capacity_pages
        self._refs: dict[int, int] = {}  # indexed page key -> running requests using it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0, oldest first
        self.stats = CacheStats()

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_pages * self.page_size

    @property
    def used_pages(self) -> int:
        return self.capacity_pages - self.free_pages - len(self._evictable)

    @property
    def indexed_pages(self) -> int:
        return len(self._refs)

    @property
    def private_pages(self) -> int:
        """Pages running requests own that no other request can hit: uncomputed prompt, output room."""
        return self.capacity_pages - self.free_pages - len(self._refs)

    def match(self, keys: list[int], limit: int) -> int:
        """Number of leading keys (at most ``limit``) whose pages are indexed."""
        refs = self._refs
        n = 0
        while n < limit and keys[n] in refs:
            n += 1
        return n

    def try_admit(self, keys: list[int], matched: int, private_pages: int) -> bool:
        """Lock ``keys[:matched]`` and allocate ``private_pages``, evicting if needed; all or nothing."""
        evictable_matched = sum(1 for k in keys[:matched] if self._refs[k] == 0)
        if self.free_pages + len(self._evictable) - evictable_matched < private_pages:
            return False
        for k in keys[:matched]:
            self._lock(k)
        self._evict_until_free(private_pages)
        self.free_pages -= private_pages
        return True

    def publish(self, key: int) -> bool:
        """A private page became computed prompt KV under ``key``; the caller keeps a reference.

        Returns False when another request published the same key first: the caller then uses the
        indexed copy and its private page goes back to the free pool.
        """
        if key in self._refs:
            self._lock(key)
            self.free_pages += 1
            return False
        self._refs[key] = 1
        return True

    def release(self, locked_keys: list[int], private_pages: int) -> None:
        """A request left: unreference its indexed pages (last first) and free its private ones."""
        for k in reversed(locked_keys):
            refs = self._refs[k] - 1
            self._refs[k] = refs
            if refs == 0:
                self._evictable[k] = None
        self.free_pages += private_pages

    def record_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.stats.query_tokens += prompt_tokens
        self.stats.hit_tokens += cached_tokens

    def flush(self) -> bool:
        """Drop every unreferenced cached page (SGLang ``/flush_cache``); False if requests are running."""
        if self.used_pages:
            return False
        for k in self._evictable:
            del self._refs[k]
        self.free_pages += len(self._evictable)
        self._evictable.clear()
        return True

    def _lock(self, key: int) -> None:
        refs = self._refs[key]
        if refs == 0:
            del self._evictable[key]
        self._refs[key] = refs + 1

    def _evict_until_free(self, pages: int) -> None:
        while self.free_pages < pages:
            key, _ = self._evictable.popitem(last=False)
            del self._refs[key]
            self.free_pages += 1
            self.stats.evicted_pages += 1
