"""Approximate index of which endpoints recently received which prefix blocks. Pure, bounded.

The gateway cannot see the engines' KV caches; it remembers instead where it sent each prompt. The
index maps a chained block key (``affinity.prefix_hashes``) to the endpoints that received a prompt
with that prefix, each with the time it last did. Because key ``i`` stands for the whole prefix up
to block ``i``, the endpoints listed under the deepest known key of a prompt are exactly the ones
that received its whole matched prefix: no intersection over blocks is needed.

Bounds. Entries (one per block and endpoint) are capped at ``capacity_blocks``; the least recently
recorded block is dropped first, with all its endpoints. An endpoint's entry older than ``ttl_s`` is
ignored (the engine has probably evicted those pages by then, and a stale entry must not attract
traffic) and dropped lazily: a block as soon as its newest entry expires (checked at the old end of
the LRU order on every call, so every block left has a fresh endpoint), and a single endpoint's
entry when a lookup finds it expired. Memory is O(capacity_blocks): about 290 bytes per block
in CPython (key, endpoint map, LRU links), the same for one to five endpoints, so 262,144 entries
take at most about 76 MB per process.

Prefix-closed by construction. ``record`` touches a prompt's blocks deepest first, so each block is
at least as recent as every deeper block of the same prompt, in LRU order and in timestamps. Hence
eviction and expiry only ever remove the deep end of a chain, and if block ``i`` is known (with a
fresh endpoint), so is every block before it. ``match`` relies on this to find the deepest known
block by binary search.

Cost: ``match`` is O(log n) dictionary lookups for n keys, plus one pass over the endpoints of the
block found; ``record`` is O(n) (about 0.15 us per block); ``forget`` is O(capacity), in steps, and
is meant for an endpoint removed for good. ``now`` must not go backwards (use ``time.monotonic()``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

# Blocks one step of ``forget`` walks: about 2 ms.
FORGET_BATCH = 4096


class PrefixIndex:
    """Block key -> {endpoint id: last time recorded}, LRU-bounded, entries expire after ``ttl_s``."""

    __slots__ = ("_blocks", "_entries", "capacity_blocks", "ttl_s")

    def __init__(self, capacity_blocks: int, ttl_s: float):
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be at least 1, got {capacity_blocks}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.capacity_blocks = capacity_blocks
        self.ttl_s = ttl_s
        self._blocks: OrderedDict[int, dict[str, float]] = OrderedDict()
        self._entries = 0

    def __len__(self) -> int:
        """Entries held (one per block and endpoint), fresh or not yet dropped."""
        return self._entries

    def match(self, hashes: Sequence[int], now: float) -> tuple[int, tuple[str, ...]]:
        """Longest known prefix of ``hashes``: (its depth in blocks, the endpoints holding all of it).

        Returns ``(0, ())`` when not even the first block is known to a fresh endpoint.
        """
        self._drop_old(now)
        # Every block left has a fresh endpoint, and known blocks are prefix-closed: binary search
        # for the deepest. Invariant: depth `found` is known (0 trivially), depths above `limit`
        # are not.
        blocks = self._blocks
        found, limit = 0, len(hashes)
        while found < limit:
            mid = (found + limit + 1) >> 1
            if hashes[mid - 1] in blocks:
                found = mid
            else:
                limit = mid - 1
        if not found:
            return 0, ()
        holders = blocks[hashes[found - 1]]
        if len(holders) == 1:
            return found, tuple(holders)
        cutoff = now - self.ttl_s
        fresh = tuple([endpoint for endpoint, seen in holders.items() if seen >= cutoff])
        if len(fresh) < len(holders):
            for endpoint in [e for e, seen in holders.items() if seen < cutoff]:
                del holders[endpoint]
                self._entries -= 1
        return found, fresh

    def record(self, hashes: Sequence[int], endpoint_id: str, now: float) -> None:
        """Note that ``endpoint_id`` received a prompt with these block keys at ``now``."""
        blocks = self._blocks
        get = blocks.get
        touch = blocks.move_to_end
        added = 0
        for key in reversed(hashes):
            holders = get(key)
            if holders is None:
                blocks[key] = {endpoint_id: now}
                added += 1
            else:
                if endpoint_id not in holders:
                    added += 1
                holders[endpoint_id] = now
                touch(key)
        self._entries += added
        self._drop_old(now)

    def forget(self, endpoint_id: str) -> Iterator[None]:
        """Drop every entry of an endpoint that is gone for good, ``FORGET_BATCH`` blocks at a time.

        A generator: it yields after each batch, so an async caller can let requests run in between
        (walking a full index of 262,144 entries at once stalled the event loop for about 100 ms;
        in steps, the first step, which lists the keys, pauses for about 6 ms and the others for about
        2 ms).
        Keys are taken in the dictionary's insertion order (``key_batches``). Records made meanwhile
        are kept. A block one prompt
        recorded is walked deepest first; a chain that grew over several prompts can lose a middle
        block first, and until the walk reaches the deeper ones (all the departed endpoint's alone)
        a lookup may stop there and name the departed endpoint, which the picker skips as it skips
        an unavailable holder.
        """
        blocks = self._blocks
        for batch in key_batches(blocks):
            for key in batch:
                holders = blocks.get(key)
                if holders is not None and holders.pop(endpoint_id, None) is not None:
                    self._entries -= 1
                    if not holders:
                        del blocks[key]
            yield

    def _drop_old(self, now: float) -> None:
        blocks = self._blocks
        cutoff = now - self.ttl_s
        # Blocks are moved to the end whenever they are recorded, so the first block's newest entry
        # is the oldest of all, and expired blocks are exactly a run at the front.
        while blocks:
            key = next(iter(blocks))
            holders = blocks[key]
            if self._entries <= self.capacity_blocks and max(holders.values()) >= cutoff:
                return
            del blocks[key]
            self._entries -= len(holders)


def key_batches(table: dict) -> Iterator[list]:
    """The keys ``table`` has now, ``FORGET_BATCH`` at a time, for a walk that lets other work run
    between batches. Listed in the plain dictionary's insertion order: for an OrderedDict that is
    eight times quicker than following its LRU links, scattered over the heap."""
    keys = list(dict.keys(table))
    for start in range(0, len(keys), FORGET_BATCH):
        yield keys[start:start + FORGET_BATCH]
