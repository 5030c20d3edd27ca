"""Routing policies: choose an ordered list of endpoints (the choice, then distinct fallbacks).

Contract
--------
``policy.pick(endpoints, keys, now)`` looks only at ``available`` endpoints and returns a
:class:`Decision`: the chosen endpoint first, then up to ``max_candidates - 1`` distinct fallbacks
for retries, the ``branch`` that decided (a metric label), and the depth of the longest known prefix
in blocks. ``policy.observe(endpoint_id, keys, now)`` must be called once a request has actually
been sent to an endpoint (the choice or a fallback): stateful policies learn where prefixes and
sessions live from it, never from ``pick``, so a retry teaches them the real placement. Nothing here
does I/O or reads a clock; ``now`` is ``time.monotonic()`` from the caller.

Policies
--------
``round_robin``, ``random`` and ``least_load`` / ``power_of_two`` (on ``(load + 1) / weight``, so
that slow-starting endpoints fill up gradually) are the baselines.

Why ``power_of_two`` and not ``least_load`` is the batch pools' default. A load is this process's
own in-flight count plus what each engine last reported of everyone else's (``health``, every
``scrape_interval_s``), so between two scrapes every gateway process sees the same stale picture
and updates only its own share of it. ``least_load`` then herds: a replica that has just emptied
looks empty to every process, and each of them sends it enough to catch up with the others before
the next scrape shows what the rest did: it is sent its deficit once per process (ai-dynamo/dynamo
#589). The less loaded of two random draws takes the emptied replica only when it
draws it, about 2 / N of the time, which is old information's classic remedy (Mitzenmacher, "How
useful is old information?", 2000). In a simulation of a batch pool (8 replicas of 16 slots,
requests of 1-3 s at 70-90 % of capacity, a 1 s scrape; a scratch script driving these policy
classes), the mean max/mean busy for ``least_load`` against ``power_of_two`` was 1.05 against
1.11-1.14 with one process; 1.66-1.80 against 1.33-1.39 with 4, and 2.00-2.21 against 1.37-1.43
with 8. Latency p99 rose over the one-process figure by 34-49 % against 0-13 % (4 processes) and
73-120 % against 0-17 % (8). In one process ``least_load`` balances a little better; a region runs
several.

``session``: a session lives on one endpoint, chosen when it is first seen and kept while that
endpoint is available and within its load bound plus a slack (below). A new session (or one idle
for longer than the session TTL) is placed like a cold prefix: on the least loaded of the first
``ring_choices`` endpoints clockwise from its key on the consistent-hash ring (``ring.HashRing``)
that are within their bounds (``HashRing.bounded_owner``), so it has at most ``ring_choices``
possible homes, and processes that see the same loads agree on it. When its endpoint fails or
passes bound + slack, the session moves once, placed the same way, and stays there, even when the
old endpoint recovers, instead of flapping back and paying a second cold prefill. A bounded,
expiring map remembers every live session's endpoint: knowing that a session is new is what lets
its first request be placed by load instead of being held to its ring owner with slack. With
``ring_choices = 1`` placement is the ring owner alone, so a session this process does not know
is presumed to live on its owner (another process may have placed it there) and keeps the slack
there: the owner-only rule, on which all processes agree whatever their loads. One exception needs
no memory: a request that opens its conversation (``RouteKeys.opening``: a chat with a single
message besides system ones) is a new session in every process, so it is placed within its bound,
with no slack. (In the replay simulation of hh-rlhf on 8 endpoints, one process: max/mean in flight
1.57 -> 1.38 at the same hit ratio; with 2 processes sharing clients, 1.57 -> 1.46 for hit ratio
0.359 -> 0.351, the opening turns placed past a busy owner that the other process looks for there.)
Without a session key the request is placed as ``power_of_two`` places it, for the same reason as
the batch pools (branch ``no_session_key``).

``prefix`` (the interactive default): a request with a session key is routed as above, one with
neither a session key nor a prompt as one without a session key (branch ``no_prefix_key``). Otherwise:

1. Look the prompt's block keys up in the ``PrefixIndex``: the endpoints holding its longest known
   prefix. Pick the least loaded of them; keep it if it is within its load bound (``prefix_hit``).
2. Else (``overflow``), or if nothing matched (``ring``), place the request by the ring key, the
   chain key of the first ``ring_key_blocks`` blocks: on the least loaded of its first
   ``ring_choices`` ring endpoints within their bounds. A cold prefix thus lands on one of a few
   endpoints fixed by its key, the same one from every process and replica that sees the same
   loads, and the load bound (not the cache) decides when it lands elsewhere, so a busy endpoint
   never draws all new traffic.

Why choices and not the ring owner alone. Placing by hash alone balances the count of keys, not
their cost: prompts differ in length and hot prefixes keep their holders busy, so the owners of
some keys are loaded (within bound) while others idle. A loaded endpoint runs more requests, whose
KV pages are pinned, so it caches less and evicts more, and its queue grows longer still. The least
loaded of a few ring candidates evens this out. In a replay simulation of the benchmark's traces
(``loadtests/replay.py`` scenarios on 8 endpoints, the real engine stages on a virtual clock,
Mooncake averaged over 5 ring layouts), for 1 / 2 / 3 choices: Mooncake prefix hit ratio 0.34 /
0.40 / 0.42, TTFT p99 -22 % / -37 %, max/mean in flight 1.32 / 1.28 / 1.27; hh-rlhf sessions
max/mean in flight 1.54 / 1.29 / 1.27 at the same hit ratio.

The price is agreement between processes. Loads are the shared signal: an endpoint's load is this
process's in-flight count plus what the engine reports of everyone else's, so processes see about
the same numbers at the same moment, and a prefix or session has at most ``ring_choices`` homes,
never the whole pool. But loads change, and a process that never saw a prefix or session (each
process indexes only what it sent) places it by the loads of a later moment. The same simulation
with every request sent to one of 2 (4) processes at random: Mooncake hit ratio about equal to the
owner alone (0.30 with 2 processes; 0.25 against 0.29 with 4), TTFT p99 and balance still better;
hh-rlhf session hit ratio 72 % (50 %) of the oracle against 94 % (92 %) with one choice.

Gossip (``gossip.py``: between the workers of one gateway by default, between gateway pods when
``gossip.peers`` names them) takes most of this price away: every process records where the others
placed prompts and sessions, within ``gossip.interval_s``, so a turn reaching a process that never
saw its conversation goes where the conversation was placed, whatever the loads said then. What is
left is two requests of one new prompt arriving at two processes within that interval. In the
replay with two worker processes sharing the clients (hh-rlhf, ``ring_load_factor = 1.0``): hit
ratio 0.377 with one process, 0.305 with two, 0.377 with two that gossip. Hence the default of 2
choices (measured on the replay itself, one process and two gossiping workers, two runs each against
one choice: Mooncake hit ratio 0.41-0.42 against 0.38-0.42, hh-rlhf max/mean busy 1.24-1.27 against
1.25-1.31; three choices did no better than two). Processes that share clients without gossip need
``ring_choices = 1``.

A prefix shared by every request (a common system prompt) is handled by the two steps together.
It starts on one ring candidate; when that endpoint passes its bound, the overflow goes to another
endpoint, which from then on also holds the prefix. Step 1 chooses the least loaded of all holders,
so a hot prefix spreads over as many endpoints as its load needs, and every request still lands
where its prefix is cached. Deeper, conversation-specific prefixes have one holder, so turn n + 1 of
a conversation follows turn n. Each hot prefix is cached on a few endpoints instead of one: a little
KV memory spent for balance. One gap: if a conversation's first user message ends in the same block
as the shared system prompt, turn 1 left no conversation-specific whole block, so turn 2 goes to the
least loaded holder of the system prompt; it re-prefills that message and the first answer there,
and later turns follow it.

Bounds
------
A prefix holder is kept, and a ring candidate takes a request, only within the Mirrokni bound
``ring.load_bound``: at most ``ceil(c * (total + 1) * share)`` requests after taking it, i.e. about
``c`` times the mean. A session's endpoint keeps it up to ``session_slack`` requests beyond that
bound: a move costs a prefill of the whole conversation, while a couple of extra requests in flight
cost little, and without slack, at low load (bound 2 or 3) sessions would be pushed around by the
rounding of the bound alone. (A simulation of 32 sessions on 4 endpoints: 137 moves in 3,500 turns
with no slack, none with a slack of 2, and the same max/mean load.) A new session gets no slack: it
has nothing cached anywhere yet (with several choices, new sessions held to their ring owner with
slack are what kept max/mean in flight at 1.54 above). Prefix hits get no slack either: a hot
prefix answers overload by spreading to more holders, which keeps the load within ``c`` times the
mean.

Placement (cold prefixes, overflows, new and moved sessions) has its own factor ``ring_c``
(``routing.ring_load_factor``), while ``c`` bounds what holders and session endpoints keep. New work
is the cheapest to put anywhere, and where it lands decides how much room the holders have later:
with ``ring_c = 1`` (placement at the mean, rounded up) the same simulation gives, for Mooncake and
one process, hit ratio 0.34 -> 0.41, TTFT p99 -31 %, max/mean in flight 1.32 -> 1.24, and for
hh-rlhf max/mean 1.38 -> 1.23. The price is agreement again: at the mean, a cold prefix passes its
owner about as often as not, and a process that never saw it looks for it on the owner; with 4
processes sharing clients, Mooncake hit ratio 0.30 -> 0.24 and a worse p99. Gossip pays that
price as it pays the choices' (above), hence the default ``ring_c = 1``; processes that share
clients without gossip need ``ring_c = c``.

KV saturation
-------------
Request counts miss what long prompts do to an engine: a replica running a few long-context requests
can have its KV cache full while its count looks light. An engine without free KV pages holds new
requests in its queue until running ones finish (or preempts running ones, which then prefill
again), so new work placed there waits. An endpoint whose engine last reported KV usage at or above
``health.kv_saturation`` (``Candidate.saturated``, set by the scraper, cleared when the scrape goes
stale) therefore takes no new work: cold prefixes, overflows and new or moved sessions are placed
on the ring among the other endpoints (branch ``kv_saturated`` when a saturated endpoint would have
taken the request), and the baseline policies and requests without keys pass it over. What it
holds stays: a prefix hit needs KV pages only for its uncached tail, and a session's next turn only
for its new messages, so they keep their endpoint within the usual bounds. (Moving them too was
tried: in the Mooncake replay it moved 46 of 987 requests off saturated holders and lowered the hit
ratio and TTFT, see README "Routing quality".) If every available endpoint is saturated, saturation
is ignored.

Cost: ``pick`` is O(endpoints + log(prefix keys) + ring points walked) and allocates a few small
containers; ``observe`` is O(prefix keys). The ring is rebuilt only when the list of endpoint ids
changes. Sessions take one map entry each (about 220 bytes) while they live, at most
``session_capacity`` (100,000: about 22 MB).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from heapq import nsmallest
from math import inf
from typing import NamedTuple, Protocol

import msgspec

from gateway.prefix_index import PrefixIndex, key_batches
from gateway.ring import HashRing, load_bound


class Candidate(Protocol):
    """What the picker reads of an endpoint (``pool.Endpoint`` satisfies it)."""

    @property
    def id(self) -> str:
        """Stable, unique endpoint id (its ring identity)."""

    @property
    def load(self) -> float:
        """In-flight requests combined with the engine's queue; higher is busier."""

    @property
    def weight(self) -> float:
        """Share in (0, 1]: 1 normally, less while slow-starting."""

    @property
    def available(self) -> bool:
        """Healthy and not ejected; the picker ignores endpoints that are not."""

    @property
    def saturated(self) -> bool:
        """The engine reports its KV cache (nearly) full; the picker passes it over while it can."""


class RouteKeys(msgspec.Struct, frozen=True, gc=False):
    """A request's routing keys: ``affinity.prefix_hashes`` of its canonical prompt (may be empty
    when the request has no prompt), ``affinity.key_hash`` of its session key, if any, and whether
    the request opens its conversation (a chat with a single message besides system ones: a new
    session, whatever any process remembers)."""

    prefix: list[int]
    session: int | None = None
    opening: bool = False


class Decision(NamedTuple):
    """``endpoints``: the choice first, then distinct fallbacks (empty if none is available);
    ``branch``: which rule decided, a metric label; ``matched_blocks``: depth of the longest prefix
    found in the index (0 for policies that do not look)."""

    endpoints: list[Candidate]
    branch: str
    matched_blocks: int


class Policy(Protocol):
    """A routing policy; see the module docstring for the contract of ``pick`` and ``observe``."""

    name: str

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision: ...

    def observe(self, endpoint_id: str, keys: RouteKeys, now: float) -> None: ...

    def forget(self, endpoint_id: str) -> Iterator[None]:
        """The endpoint left its pool (``discovery``): whatever was learnt about it is void, and a
        replica that comes back under its id has a cold cache. In steps: the caller may let other
        work run at each yield."""


BRANCHES = ("no_endpoint", "round_robin", "random", "least_load", "power_of_two", "session",
            "session_new", "session_moved", "no_session_key", "prefix_hit", "overflow", "ring",
            "holder_unavailable", "kv_saturated", "no_prefix_key")



def _pressure(endpoint: Candidate) -> float:
    return (endpoint.load + 1.0) / endpoint.weight


def _routable(endpoints: Sequence[Candidate]) -> list[Candidate]:
    """The available endpoints, less those whose KV cache is saturated, unless that leaves none."""
    available = [e for e in endpoints if e.available]
    for e in available:
        if e.saturated:  # rare: only then build the second list
            return [e for e in available if not e.saturated] or available
    return available


class _NoAffinity:
    """Base of the policies that learn nothing from where requests went: ``observe`` does nothing."""

    __slots__ = ("max_candidates",)
    name = ""

    def __init__(self, max_candidates: int):
        self.max_candidates = max_candidates

    def observe(self, endpoint_id: str, keys: RouteKeys, now: float) -> None:
        return None

    def forget(self, endpoint_id: str) -> Iterator[None]:
        return iter(())


class RoundRobin(_NoAffinity):
    """Each available endpoint in turn; fallbacks are the next ones in order."""

    __slots__ = ("_turn",)
    name = "round_robin"

    def __init__(self, max_candidates: int):
        super().__init__(max_candidates)
        self._turn = 0

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        available = _routable(endpoints)
        n = len(available)
        if not n:
            return Decision([], "no_endpoint", 0)
        start = self._turn % n
        self._turn = start + 1
        return Decision([available[(start + i) % n] for i in range(min(self.max_candidates, n))],
                        "round_robin", 0)


class RandomChoice(_NoAffinity):
    """Uniformly random endpoint and fallbacks; ``seed`` makes the sequence reproducible."""

    __slots__ = ("_rng",)
    name = "random"

    def __init__(self, max_candidates: int, seed: int | None):
        super().__init__(max_candidates)
        self._rng = random.Random(seed)

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        available = _routable(endpoints)
        if not available:
            return Decision([], "no_endpoint", 0)
        return Decision(self._rng.sample(available, min(self.max_candidates, len(available))), "random", 0)


class LeastLoad(_NoAffinity):
    """The endpoints with the lowest ``(load + 1) / weight``; ties go to each endpoint in turn, so
    an idle pool is not a queue in front of its first endpoint."""

    __slots__ = ("_turn",)
    name = "least_load"

    def __init__(self, max_candidates: int):
        super().__init__(max_candidates)
        self._turn = 0

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        return self.choose(_routable(endpoints), "least_load")

    def choose(self, available: list[Candidate], branch: str) -> Decision:
        n = len(available)
        if not n:
            return Decision([], "no_endpoint", 0)
        start = self._turn % n
        self._turn = start + 1
        rotated = available[start:] + available[:start]
        return Decision(nsmallest(min(self.max_candidates, n), rotated, key=_pressure), branch, 0)


class PowerOfTwo(_NoAffinity):
    """The less loaded of two random endpoints; the other is the first fallback, then random ones."""

    __slots__ = ("_rng",)
    name = "power_of_two"

    def __init__(self, max_candidates: int, seed: int | None):
        super().__init__(max_candidates)
        self._rng = random.Random(seed)

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        return self.choose(_routable(endpoints), "power_of_two")

    def choose(self, available: list[Candidate], branch: str) -> Decision:
        n = len(available)
        if not n:
            return Decision([], "no_endpoint", 0)
        drawn = self._rng.sample(available, min(max(2, self.max_candidates), n))
        if n > 1 and _pressure(drawn[1]) < _pressure(drawn[0]):
            drawn[0], drawn[1] = drawn[1], drawn[0]
        return Decision(drawn[:self.max_candidates], branch, 0)


class _LoadView:
    """One request's view of the available endpoints: by id with their loads, the total load, and
    their weights (``weight`` stays None while every weight is 1, the norm, so the bounds skip
    per-member share arithmetic). One pass, reading each endpoint's load once. ``placeable`` is
    ``load`` without the endpoints whose KV cache is saturated (the same dict while none is, or if
    all are): new work is placed only there."""

    __slots__ = ("by_id", "load", "placeable", "total", "weight", "weight_sum")

    def __init__(self, endpoints: Sequence[Candidate]):
        by_id: dict[str, Candidate] = {}
        load: dict[str, float] = {}
        total = 0.0
        slow_start = saturated = False
        for e in endpoints:
            if e.available:
                endpoint_id = e.id
                by_id[endpoint_id] = e
                held = load[endpoint_id] = e.load
                total += held
                if e.weight != 1.0:
                    slow_start = True
                if e.saturated:
                    saturated = True
        self.by_id = by_id
        self.load = load
        self.total = total
        self.weight = {i: e.weight for i, e in by_id.items()} if slow_start else None
        self.weight_sum = sum(self.weight.values()) if self.weight is not None else float(len(load))
        self.placeable = load
        if saturated:
            self.placeable = {i: held for i, held in load.items() if not by_id[i].saturated} or load

    def keeps(self, endpoint_id: str, c: float, slack: float) -> bool:
        """Whether an endpoint may keep an affinity request: within its load bound plus ``slack``."""
        share = (self.weight[endpoint_id] if self.weight is not None else 1.0) / self.weight_sum
        return self.load[endpoint_id] + 1.0 <= load_bound(c, self.total, share) + slack

    def place(self, ring: HashRing, key: int, c: float, choices: int) -> tuple[str, bool]:
        """The least loaded of the first ``choices`` placeable endpoints clockwise from ``key``
        within bound, and whether a saturated endpoint would have taken the request otherwise."""
        placeable = self.placeable
        weight = self.weight
        if placeable is not self.load and weight is not None:
            weight = {i: weight[i] for i in placeable}
        target = ring.bounded_owner(key, placeable, c, weight, choices)
        assert target is not None  # the ring holds every endpoint of the view
        if placeable is self.load:
            return target, False
        return target, target != ring.bounded_owner(key, self.load, c, self.weight, choices)

    def along(self, ring: HashRing, key: int, first: str, count: int) -> list[Candidate]:
        """``first``, then available endpoints clockwise from ``key``, ``count`` at most."""
        by_id = self.by_id
        chosen = [by_id[first]]
        if count > 1:
            for member in ring.walk(key):
                if member != first and member in by_id:
                    chosen.append(by_id[member])
                    if len(chosen) == count:
                        break
        return chosen


class _RingCache:
    """The ring over the ids of the endpoints last seen, rebuilt when the ids change. The list of
    endpoints is compared first, element by element, identity first, so the usual request (the
    pool's own endpoint objects, whose ids never change) costs no list of ids. Health flaps do not
    rebuild it: unavailable endpoints stay on the ring and are walked past, which moves exactly the
    keys a rebuild without them would move."""

    __slots__ = ("endpoints", "ids", "ring", "vnodes")

    def __init__(self, vnodes: int):
        self.vnodes = vnodes
        self.endpoints: list[Candidate] = []
        self.ids: list[str] = []
        self.ring = HashRing((), vnodes)

    def get(self, endpoints: Sequence[Candidate]) -> HashRing:
        if endpoints != self.endpoints:
            ids = [e.id for e in endpoints]
            if ids != self.ids:
                self.ring = HashRing(ids, self.vnodes)
                self.ids = ids
            self.endpoints = list(endpoints)
        return self.ring


class SessionAffinity:
    """Sticky sessions placed on the bounded-load ring (module docstring, ``session``)."""

    __slots__ = ("_keyless", "_placed", "_rings", "c", "capacity", "choices", "max_candidates", "ring_c",
                 "slack", "ttl_s")
    name = "session"

    def __init__(self, *, c: float, ring_c: float, slack: float, vnodes: int, ring_choices: int, capacity: int,
                 ttl_s: float, max_candidates: int, seed: int | None, rings: _RingCache | None = None):
        self.c = c
        self.ring_c = ring_c
        self.slack = slack
        self.choices = ring_choices
        self.max_candidates = max_candidates
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._rings = rings if rings is not None else _RingCache(vnodes)
        # Session key -> (endpoint id, last time a request went there); LRU order.
        self._placed: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self._keyless = PowerOfTwo(max_candidates, seed)

    def __len__(self) -> int:
        """Sessions remembered."""
        return len(self._placed)

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        if keys.session is None:
            return self._keyless.choose(_routable(endpoints), "no_session_key")
        view = _LoadView(endpoints)
        if not view.by_id:
            return Decision([], "no_endpoint", 0)
        return self.route(self._rings.get(endpoints), view, keys, now)

    def route(self, ring: HashRing, view: _LoadView, keys: RouteKeys, now: float) -> Decision:
        """Where ``keys.session`` goes given this view; used by the prefix policy as well."""
        session = keys.session
        assert session is not None
        placed = self._placed.get(session)
        if placed is not None and placed[1] >= now - self.ttl_s:
            current: str | None = placed[0]
        elif keys.opening:
            current = None
        elif self.choices == 1:
            # Placement is the ring owner alone: a session this process does not know most likely
            # lives there already (another process placed it), so it is treated as living there.
            current = ring.owner(session)
        else:
            current = None
        if current is None:
            branch = "session_new"
        elif current in view.by_id and view.keeps(current, self.c, self.slack):
            return Decision(view.along(ring, session, current, self.max_candidates), "session", 0)
        else:
            branch = "session_moved"
        target, displaced = view.place(ring, session, self.ring_c, self.choices)
        if displaced:
            branch = "kv_saturated"
        # Only when fractional loads leave no endpoint within bound can the target be the current one.
        return Decision(view.along(ring, session, target, self.max_candidates),
                        "session" if target == current else branch, 0)

    def observe(self, endpoint_id: str, keys: RouteKeys, now: float) -> None:
        session = keys.session
        if session is None:
            return
        placed = self._placed
        placed[session] = (endpoint_id, now)
        placed.move_to_end(session)
        cutoff = now - self.ttl_s
        while len(placed) > self.capacity or next(iter(placed.values()))[1] < cutoff:
            placed.popitem(last=False)

    def forget(self, endpoint_id: str) -> Iterator[None]:
        """Its sessions are placed afresh. In steps (``prefix_index.key_batches``), as the prefix index
        forgets: 100,000 sessions at once took about 20 ms."""
        placed = self._placed
        for batch in key_batches(placed):
            for session in batch:
                entry = placed.get(session)
                if entry is not None and entry[0] == endpoint_id:
                    del placed[session]
            yield


class PrefixAffinity:
    """Longest-prefix routing with load bounds, ring placement for cold prefixes, sessions first
    (module docstring, ``prefix``)."""

    __slots__ = ("_keyless", "_rings", "c", "choices", "index", "max_candidates", "ring_c", "ring_key_blocks",
                 "sessions")
    name = "prefix"

    def __init__(self, *, c: float, ring_c: float, session_slack: float, vnodes: int, ring_choices: int,
                 ring_key_blocks: int, index_capacity_blocks: int, index_ttl_s: float, session_capacity: int,
                 session_ttl_s: float, max_candidates: int, seed: int | None):
        self.c = c
        self.ring_c = ring_c
        self.choices = ring_choices
        self.ring_key_blocks = ring_key_blocks
        self.max_candidates = max_candidates
        self.index = PrefixIndex(index_capacity_blocks, index_ttl_s)
        self._rings = _RingCache(vnodes)
        self.sessions = SessionAffinity(c=c, ring_c=ring_c, slack=session_slack, vnodes=vnodes,
                                        ring_choices=ring_choices, capacity=session_capacity,
                                        ttl_s=session_ttl_s, max_candidates=max_candidates, seed=seed,
                                        rings=self._rings)
        self._keyless = PowerOfTwo(max_candidates, seed)

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        prefix = keys.prefix
        if keys.session is None and not prefix:
            return self._keyless.choose(_routable(endpoints), "no_prefix_key")
        view = _LoadView(endpoints)
        if not view.by_id:
            return Decision([], "no_endpoint", 0)
        ring = self._rings.get(endpoints)
        if keys.session is not None:
            return self.sessions.route(ring, view, keys, now)
        ring_key = prefix[min(self.ring_key_blocks, len(prefix)) - 1]
        depth, holders = self.index.match(prefix, now)
        if not depth:
            branch = "ring"
        else:
            best: Candidate | None = None
            lowest = inf
            for endpoint_id in holders:
                endpoint = view.by_id.get(endpoint_id)
                if endpoint is not None and (pressure := _pressure(endpoint)) < lowest:
                    best, lowest = endpoint, pressure
            if best is None:
                branch = "holder_unavailable"
            elif view.keeps(best.id, self.c, 0.0):
                return Decision(view.along(ring, ring_key, best.id, self.max_candidates), "prefix_hit", depth)
            else:
                branch = "overflow"
        target, displaced = view.place(ring, ring_key, self.ring_c, self.choices)
        if displaced:
            branch = "kv_saturated"
        return Decision(view.along(ring, ring_key, target, self.max_candidates), branch, depth)

    def observe(self, endpoint_id: str, keys: RouteKeys, now: float) -> None:
        if keys.prefix:
            self.index.record(keys.prefix, endpoint_id, now)
        if keys.session is not None:
            self.sessions.observe(endpoint_id, keys, now)

    def forget(self, endpoint_id: str) -> Iterator[None]:
        yield from self.index.forget(endpoint_id)
        yield from self.sessions.forget(endpoint_id)


POLICIES = ("prefix", "session", "round_robin", "random", "least_load", "power_of_two")


def make_policy(name: str, *, c: float, session_slack: float, vnodes: int, ring_key_blocks: int,
                index_capacity_blocks: int, index_ttl_s: float, session_capacity: int, session_ttl_s: float,
                max_candidates: int, ring_choices: int, ring_c: float, seed: int | None = None) -> Policy:
    """Build the policy called ``name`` (one of ``POLICIES``) for one pool.

    ``c``: load factor of the bounds a prefix holder or a session's endpoint keeps a request within
    (>= 1); ``ring_c``: load factor of the bound a cold prefix or a new session is placed within
    (>= 1); ``session_slack``: requests a session's endpoint may
    hold beyond its bound before the session moves (>= 0); ``vnodes``: ring points per endpoint;
    ``ring_choices``: ring candidates a cold prefix or a new session is placed on, the least loaded
    wins (1: the bounded owner alone, the choice for processes that share clients, module
    docstring); ``ring_key_blocks``: blocks that key a cold prefix on the ring;
    ``index_capacity_blocks`` / ``index_ttl_s``: prefix index size and entry lifetime;
    ``session_capacity`` / ``session_ttl_s``: session map size and idle lifetime;
    ``max_candidates``: length of a decision's endpoint list (choice + fallbacks); ``seed``: for
    ``random``, ``power_of_two`` and the affinity policies' requests without keys (None: from the OS).
    """
    if c < 1.0 or ring_c < 1.0:
        raise ValueError(f"c and ring_c must be >= 1, got {c}, {ring_c}")
    if session_slack < 0:
        raise ValueError(f"session_slack must be >= 0, got {session_slack}")
    for key, value in (("vnodes", vnodes), ("ring_choices", ring_choices),
                       ("ring_key_blocks", ring_key_blocks),
                       ("index_capacity_blocks", index_capacity_blocks),
                       ("session_capacity", session_capacity), ("max_candidates", max_candidates)):
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    if index_ttl_s <= 0 or session_ttl_s <= 0:
        raise ValueError("index_ttl_s and session_ttl_s must be positive")
    if name == "prefix":
        return PrefixAffinity(c=c, ring_c=ring_c, session_slack=session_slack, vnodes=vnodes,
                              ring_choices=ring_choices, ring_key_blocks=ring_key_blocks,
                              index_capacity_blocks=index_capacity_blocks,
                              index_ttl_s=index_ttl_s, session_capacity=session_capacity,
                              session_ttl_s=session_ttl_s, max_candidates=max_candidates, seed=seed)
    if name == "session":
        return SessionAffinity(c=c, ring_c=ring_c, slack=session_slack, vnodes=vnodes, ring_choices=ring_choices,
                               capacity=session_capacity,
                               ttl_s=session_ttl_s, max_candidates=max_candidates, seed=seed)
    if name == "round_robin":
        return RoundRobin(max_candidates)
    if name == "random":
        return RandomChoice(max_candidates, seed)
    if name == "least_load":
        return LeastLoad(max_candidates)
    if name == "power_of_two":
        return PowerOfTwo(max_candidates, seed)
    raise ValueError(f"unknown routing policy {name!r}; expected one of {', '.join(POLICIES)}")
