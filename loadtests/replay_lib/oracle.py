"""What an ideal router could reach: the hit ratio of one cache shared by every replica.

An ideal router would make the replicas' caches behave like one cache: every request finds every
page any earlier request computed. Two such caches bound what routing can achieve:

- **unlimited**: nothing is ever evicted; the hit ratio is the trace's own reuse (no router, no
  cache size can beat it);
- **same size**: LRU over ``replicas x cache_tokens`` tokens, i.e. the total KV memory of the pool
  pooled into one cache. A router that partitions prefixes perfectly gets close to it.

Both run over the exact pages the simulator will key: each rendered prompt is turned into bytes by
the simulator's own template (``engine_nodes.sim.tokens.render_chat`` for chats, the raw prompt for
completions) and cut into ``page_size``-token pages with chained keys (``tokens.page_keys``). A
request hits its longest prefix of cached pages, at most ``(prompt_tokens - 1) // page_size`` pages
(the engine always computes the last token, as the simulator's admission does), then all its pages
become most recently used, root last, so leaves are evicted first as in a radix cache.

What the oracle leaves out makes it an upper bound: no page is pinned by running requests, output
tokens are never cached, and requests run one at a time in arrival order.

Cost: one xxh3 per 64 prompt bytes and an ``OrderedDict`` move per page, O(total prompt pages).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine_nodes.sim import tokens
from loadtests.replay_lib.workload import Rendered


@dataclass(frozen=True)
class OracleResult:
    unlimited: float
    same_size: float
    capacity_pages: int
    prompt_tokens: int


def prompt_bytes(item: Rendered) -> bytes:
    """The bytes the simulator tokenises for this request."""
    if item.messages is None:
        return item.prompt_text.encode()
    return tokens.render_chat([{"role": "user", "content": m} for m in item.messages])


def shared_cache_oracles(
    items: list[Rendered], model: str, page_size: int, capacity_tokens: int
) -> OracleResult:
    salt = tokens.model_salt(model)
    pages: list[tuple[list[int], int]] = []
    for item in items:
        data = prompt_bytes(item)
        pages.append((tokens.page_keys(data, page_size, salt), tokens.token_count(data)))
    capacity = capacity_tokens // page_size
    total = sum(n for _, n in pages)
    return OracleResult(
        unlimited=_lru_hits(pages, page_size, None) / total,
        same_size=_lru_hits(pages, page_size, capacity) / total,
        capacity_pages=capacity,
        prompt_tokens=total,
    )


def _lru_hits(pages: list[tuple[list[int], int]], page_size: int, capacity: int | None) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hit_tokens = 0
    for keys, prompt_tokens in pages:
        limit = min(len(keys), (prompt_tokens - 1) // page_size)
        n = 0
        while n < limit and keys[n] in cache:
            n += 1
        hit_tokens += n * page_size
        for key in reversed(keys):
            cache[key] = None
            cache.move_to_end(key)
        if capacity is not None:
            while len(cache) > capacity:
                cache.popitem(last=False)
    return hit_tokens
