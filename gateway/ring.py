"""Consistent-hash ring with virtual nodes, and bounded-load lookup. Pure and deterministic.

Algorithm
---------
Each member (an endpoint id) is placed at ``vnodes`` points of the 64-bit circle,
``xxh3_64(utf8(member), seed=i)`` for ``i = 0 .. vnodes-1``; the points are sorted once. A key (any
64-bit int: a prefix block hash, a session-key hash) belongs to the member of the first point at or
after it, going clockwise and wrapping at 2**64. Positions depend only on member ids, never on
Python's per-process ``hash``, so every worker process and every gateway replica with the same
members computes the same owner for a key.

Walking on clockwise from a key yields every member once, in an order that depends on the key; it
is the key's preference list. Removing a member hands each of its keys to the next member on that
key's list, and adding one takes keys only from the members it lands in front of, so about 1/N of
the keys move either way. Virtual nodes even out the members' shares of the circle: a share
deviates from 1/N by about 1/sqrt(vnodes), 8 % with 160 points (the largest of 16 members is
typically 10-20 % above 1/N); the load bound below caps what that leaves.

Bounded loads (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2017):
with ``total`` requests in flight over the members, a member may take one more request only while

    load + 1 <= ceil(c * (total + 1) * share)        share = weight / sum of weights

(``load_bound``). The bounded owner of a key is the first member on its list that passes. With
``c >= 1`` the bounds add up to at least ``total + 1``, so (with whole-number loads) some member
always passes, no member ever holds more than about ``c`` times its share, and a key moves off its
owner only while that owner is overloaded. ``c`` trades balance (near 1: tight, but keys move often) against affinity
(large: keys stay, and one hot key can pile up ``c`` times the mean on one member). Members with
weight < 1 (slow start after joining or recovering) get a proportionally smaller bound.

Choices on the list. ``bounded_owner(..., choices=d)`` takes, of the first ``d`` members of the
key's list that pass their bound, the one with the least ``(load + 1) / weight`` (ties to the
earlier). ``d = 1`` is the bounded owner. ``d = 2`` or ``3`` is the "power of d choices"
(Mitzenmacher) confined to the key's own preference list: placement by hash alone leaves members
with uneven load even within their bounds (their shares of the keys differ, and so do the keys'
costs), while the least loaded of ``d`` candidates is close to least-loaded placement; yet a key
still lands on one of a few fixed members, so callers with the same view agree, callers whose
views differ disagree only among those ``d``, and a key never has more than ``d`` homes while
loads stay within bounds. Loads change over time, though, so a caller that places a key later may
choose another of the ``d``; ``gateway.picker`` weighs what that costs several processes.

Cost: building sorts the V = N * vnodes points and precomputes, for each point, the first
``PREFERENCE_DEPTH`` distinct members clockwise: O(V log V + V * depth), about 6 ms for 16 members
and 30 ms for 64 in CPython, so the caller rebuilds only when membership changes. ``owner`` and
``preference`` are one binary search, O(log V); ``bounded_owner`` then reads the precomputed
members until ``choices`` pass, and walks on point by point only past the first ``PREFERENCE_DEPTH``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from math import ceil, inf

from xxhash import xxh3_64_intdigest

# Guards ceil() against float error: c * (total + 1) * share that should be an integer may come out
# a hair above it and would grant one extra request.
_EPSILON = 1e-9

# Members precomputed per point for the common case: a lookup needs the first acceptable member
# and a couple of fallbacks. Deeper walks (many members unavailable or overloaded) scan the points.
PREFERENCE_DEPTH = 8


def load_bound(c: float, total: float, share: float) -> int:
    """Most requests a member with ``share`` of the weight may hold after taking one more, when
    ``total`` are in flight: ``ceil(c * (total + 1) * share)``."""
    return ceil(c * (total + 1.0) * share - _EPSILON)


class HashRing:
    """Consistent-hash ring over ``members`` (distinct ids) with ``vnodes`` points each."""

    __slots__ = ("_heads", "_owners", "_points", "members", "vnodes")

    def __init__(self, members: Sequence[str], vnodes: int = 160):
        if vnodes < 1:
            raise ValueError(f"vnodes must be at least 1, got {vnodes}")
        if len(set(members)) != len(members):
            raise ValueError(f"ring members must be distinct, got {list(members)}")
        self.members: tuple[str, ...] = tuple(members)
        self.vnodes = vnodes
        # Ties between points (a 2**-64 event) are broken by member id, so the ring does not depend
        # on the order the members were given in.
        points = sorted((xxh3_64_intdigest(m.encode(), i), m) for m in self.members for i in range(vnodes))
        self._points = [p for p, _ in points]
        self._owners = [m for _, m in points]
        self._heads = self._preference_heads()

    def _preference_heads(self) -> list[tuple[str, ...]]:
        """For each point, the first ``PREFERENCE_DEPTH`` distinct members clockwise from it.

        Lookups then read a tuple instead of walking points and de-duplicating on every request.
        Built backwards around the ring twice, so each point extends its successor's head: O(V * d).
        """
        owners = self._owners
        n = len(owners)
        depth = min(PREFERENCE_DEPTH, len(self.members))
        heads: list[tuple[str, ...]] = [()] * n
        head: tuple[str, ...] = ()
        for i in range(2 * n - 1, -1, -1):
            member = owners[i % n]
            head = (member, *[m for m in head if m != member])[:depth]
            heads[i % n] = head
        return heads

    def __len__(self) -> int:
        return len(self.members)

    def preference(self, key: int) -> tuple[str, ...]:
        """The first ``min(PREFERENCE_DEPTH, len(members))`` members of ``walk(key)``, precomputed."""
        heads = self._heads
        if not heads:
            return ()
        i = bisect_left(self._points, key)
        return heads[i if i < len(heads) else 0]

    def walk(self, key: int) -> Iterator[str]:
        """Every member once, clockwise from ``key``: the key's owner first."""
        head = self.preference(key)
        if len(head) == len(self.members):
            return iter(head)
        return self._walk_past(key, head)

    def _walk_past(self, key: int, head: tuple[str, ...]) -> Iterator[str]:
        # More members than PREFERENCE_DEPTH: the precomputed head, then scan the points on.
        yield from head
        owners = self._owners
        n = len(owners)
        seen = set(head)
        start = bisect_left(self._points, key)
        for i in range(start, start + n):
            member = owners[i - n if i >= n else i]
            if member not in seen:
                seen.add(member)
                yield member
                if len(seen) == len(self.members):
                    return

    def owner(self, key: int) -> str | None:
        """The member of the first point at or after ``key``; None if the ring is empty."""
        head = self.preference(key)
        return head[0] if head else None

    def bounded_owner(self, key: int, load: Mapping[str, float], c: float,
                      weight: Mapping[str, float] | None = None, choices: int = 1) -> str | None:
        """Of the first ``choices`` members clockwise from ``key`` whose ``load + 1`` is within their
        ``load_bound``, the one with the least ``(load + 1) / weight``; ties go to the earlier one.

        ``choices=1`` is the plain bounded owner: the first member that passes. ``load`` maps each
        eligible member to its load; ring members missing from it are skipped (unavailable), and
        ``total`` is the sum of its values. ``weight`` maps the same members to their weights
        (default: equal). With fractional loads it can happen that no member passes; then the
        member with the most room relative to its share is returned, so the result is None only
        when no ring member is in ``load``.
        """
        total = sum(load.values())
        if weight is None:
            # Equal shares: one bound for all, and the load itself orders the candidates.
            bound = load_bound(c, total, 1.0 / len(load)) if load else 0
        else:
            wsum = sum(weight.values())
        chosen: str | None = None
        best: str | None = None
        chosen_pressure = best_pressure = inf
        passed = 0
        for member in self.walk(key):
            held = load.get(member)
            if held is None:
                continue
            if weight is None:
                pressure = held
            else:
                share = weight[member]
                bound = load_bound(c, total, share / wsum)
                pressure = (held + 1.0) / share
            if held + 1.0 <= bound:
                if pressure < chosen_pressure:
                    chosen, chosen_pressure = member, pressure
                passed += 1
                if passed == choices:
                    return chosen
            elif pressure < best_pressure:
                best, best_pressure = member, pressure
        return chosen if chosen is not None else best
