"""Where a router's cache hits went: its hit ratio, taken apart step by step from the trace's reuse.

Each request's hit (prompt tokens in whole pages, at most ``(prompt_tokens - 1) // page_size``
pages, as the simulator counts them) is computed under four assumptions, each stricter than the
one before:

1. **unlimited**: the pages of any request sent earlier, on any replica, never evicted: the
   trace's own reuse in the order the requests were actually sent;
2. **same replica**: only the pages of earlier requests sent to the replica this one went to, never
   evicted: what the router's placement allows;
3. **prefilled**: of those, only requests whose prefill had finished (their first token had reached
   the client) when this one was sent: what placement allows at this arrival rate;
4. **actual**: what the engines reported (``usage.prompt_tokens_details.cached_tokens``).

The gaps name the losses: 1 to 2 is placement (a prefix's requests split across replicas, by
load-bound overflows or by placing a cold prefix on one replica and its reuse on another), 2 to 3
is timing (a reuse sent while its first use is still in prefill), 3 to 4 is each replica's own
eviction and the pages its running requests hold. The same-size oracle's gap (unlimited to same
size) is what eviction costs one pooled cache, for comparison. Step 3 is an approximation: engines
publish pages chunk by chunk while they prefill, so a reuse can hit part of a prefill still running,
and ``actual`` can come out slightly above ``prefilled``.

Which replica served a request is read from the simulator's request log (``/sim/requests``): by the
``X-Request-Id`` the driver sent, when the router passed it on; otherwise by matching the record's
prompt to the trace requests that carried it, in order, so that it works behind any router. (A
quarter of the Mooncake replay's requests repeat an earlier prompt exactly; matched by prompt, two
of them served by different replicas may be swapped, which can move a few hits between steps.)

Cost: one ``page_keys`` pass per request and O(total prompt pages) set operations per step.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from engine_nodes.sim import tokens
from loadtests.replay_lib.driver import Outcome, request_id
from loadtests.replay_lib.oracle import prompt_bytes
from loadtests.replay_lib.workload import Rendered


@dataclass(frozen=True)
class Placement:
    """The replica that served each request (None: no finished record, e.g. an error)."""

    where: list[int | None]
    by_prompt: int  # of them, placed by matching prompts: the router did not pass the request id on


@dataclass(frozen=True)
class HitLoss:
    unlimited: float
    same_replica: float
    prefilled: float
    actual: float
    requests: int  # the successful requests with a known replica, which all four count
    by_prompt: int  # Placement.by_prompt

    def line(self) -> str:
        return (f"unlimited {self.unlimited:.3f} -> same replica {self.same_replica:.3f} -> prefilled "
                f"{self.prefilled:.3f} -> actual {self.actual:.3f} ({self.requests} requests, "
                f"{self.by_prompt} placed by prompt)")


def _prompt_key(item: Rendered) -> Hashable:
    return item.messages if item.messages is not None else item.prompt_text


def _record_id(record: dict) -> str | None:
    return next((v for k, v in record["headers"].items() if k.lower() == "x-request-id"), None)


def _record_key(record: dict) -> Hashable:
    body = json.loads(record["body"])
    if "messages" in body:
        return tuple(m["content"] for m in body["messages"])
    return body.get("prompt")


def placements(items: Sequence[Rendered], replica_logs: Sequence[Sequence[dict]]) -> Placement:
    """Which replica served each item to its end, from the replicas' request logs."""
    by_id = {request_id(i): i for i in range(len(items))}
    where: list[int | None] = [None] * len(items)
    unnamed: list[tuple[int, dict]] = []
    for replica, records in enumerate(replica_logs):
        for record in records:
            if not record["finished"]:
                continue
            index = by_id.get(_record_id(record) or "")
            if index is None:
                unnamed.append((replica, record))
            else:
                where[index] = replica
    waiting: defaultdict[Hashable, deque[int]] = defaultdict(deque)
    for i, item in enumerate(items):
        if where[i] is None:
            waiting[_prompt_key(item)].append(i)
    by_prompt = 0
    for replica, record in unnamed:
        if queue := waiting.get(_record_key(record)):
            where[queue.popleft()] = replica
            by_prompt += 1
    return Placement(where, by_prompt)


def hit_loss(items: Sequence[Rendered], outcomes: Sequence[Outcome], placement: Placement,
             page_size: int, model: str) -> HitLoss:
    """The four hit ratios of the module docstring, over the successful requests with a replica."""
    where = placement.where
    salt = tokens.model_salt(model)
    counted = [i for i, o in enumerate(outcomes)
               if o.error is None and o.ttft_s is not None and o.prompt_tokens and where[i] is not None]
    keys = {i: tokens.page_keys(prompt_bytes(items[i]), page_size, salt) for i in counted}
    limit = {i: min(len(keys[i]), (outcomes[i].prompt_tokens - 1) // page_size) for i in counted}

    def matched(i: int, cached: set[int]) -> int:
        n, k, top = 0, keys[i], limit[i]
        while n < top and k[n] in cached:
            n += 1
        return n * page_size

    by_send = sorted(counted, key=lambda i: outcomes[i].sent_at)
    anywhere: set[int] = set()
    per_replica: defaultdict[int | None, set[int]] = defaultdict(set)
    unlimited = same_replica = 0
    for i in by_send:
        unlimited += matched(i, anywhere)
        same_replica += matched(i, per_replica[where[i]])
        anywhere.update(keys[i])
        per_replica[where[i]].update(keys[i])

    # Sends and first tokens on one clock; at equal times a first token counts before a send.
    events = sorted([(outcomes[i].sent_at, 1, i) for i in counted]
                    + [(outcomes[i].sent_at + outcomes[i].ttft_s, 0, i) for i in counted])  # type: ignore[operator]
    prefilled_pages: defaultdict[int | None, set[int]] = defaultdict(set)
    prefilled = 0
    for _, is_send, i in events:
        if is_send:
            prefilled += matched(i, prefilled_pages[where[i]])
        else:
            prefilled_pages[where[i]].update(keys[i])

    total = sum(outcomes[i].prompt_tokens for i in counted)
    actual = sum(outcomes[i].cached_tokens for i in counted)

    def ratio(hits: int) -> float:
        return hits / total if total else math.nan

    return HitLoss(ratio(unlimited), ratio(same_replica), ratio(prefilled), ratio(actual), len(counted),
                   placement.by_prompt)
