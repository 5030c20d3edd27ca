"""Placement gossip: every gateway process tells its peers where it sent each prefix and session,
and how many requests it has in flight where.

Why. Each process learns where prefixes and sessions live only from the requests it sent itself
(``picker``: ``observe``). Clients do not stay on one process: the official SDKs close an idle
connection after a few seconds, and the next one lands on any worker or gateway pod. A process that
never saw a prompt's first turn places it anew on the ring by its own view of the loads, and
whenever that differs from where the first process placed it, the turn pays a cold prefill. Measured with the
routing benchmark (``loadtests/replay.py``, 8 replicas, one gateway with ``--workers 2`` sharing the
clients' connections, no gossip): the hh-rlhf hit ratio fell from 0.374 to 0.344 against one
process (97.7 % → 89.8 % of the same-size oracle), Mooncake's from 0.396 to 0.345. Dynamo's router
answers the same problem by syncing its replicas' decisions over NATS; here it is UDP between the
processes, with nothing else to run.

What. After a request is sent, the process's own policy learns the placement as before, and the
placement (pool, endpoint id, the prompt's block keys, the session key) joins an outbox. Every
``gossip.interval_s`` the outbox goes out as datagrams to every peer. A peer records each placement
in its own policy as if it had sent the request itself, at the time it receives it. Nothing waits
for gossip: a request routes on what the process knows at that moment, and gossip only makes that
more. Lost, late or duplicated datagrams cost at most a hit, never a request.

Loads. A process sees its own requests in flight at each endpoint, and the rest of the engine's
running and queued requests only as of its last scrape (``health.scrape_interval_s``, a second).
Between scrapes every process places new work as if the others had sent nothing since, so several
processes overshoot the same replicas that one process would not (``routing.ring_load_factor``
places at the mean of what it sees). So every ``gossip.interval_s`` a process also sends its
requests in flight per endpoint, when they changed since its last report and at least every
``LOAD_REFRESH_S``. A peer keeps each sender's latest report, sums them into the endpoint's
``peer_in_flight``, and counts the engine's scraped load beyond its own and its peers' as
``engine_foreign`` (``pool.Endpoint.load``: the three added). It forgets a report older than
``LOAD_EXPIRY_S``, from a process that died or left.

Peers. ``gossip.peers`` lists ``host:port`` entries; a host name (in Kubernetes, the gateway's
headless Service) is resolved through the system resolver every ``discovery.interval_s`` and stands
for all its addresses: IPv4 ones while ``gossip.host`` is an IPv4 address (the default), IPv6 and
IPv4 ones when it is an IPv6 address such as ``::``, where the socket is dual stack (IPv6-only and
dual-stack clusters; IPv4 peers are sent to as ``::ffff:a.b.c.d``). With ``--workers N`` worker
``i`` listens on ``gossip.port + i`` and sends to ports ``port .. port + N - 1`` of every peer
address, so workers of one pod share as pods do. A process finds itself among its peers and drops
its own datagrams by sender id. Without peers, the workers of one supervisor still share
(``gossip.between_workers``): the supervisor binds one loopback socket per worker before starting
any, so no port is configured or raced for, and hands each worker its socket and the list of all
(:class:`Siblings`). A restarted worker gets the same socket, so its siblings need not learn
anything.

Trust. A datagram changes routing state, so each carries an HMAC-SHA256 tag (16 bytes) keyed with
the secret in the environment variable ``gossip.secret_env``; the gateway will not start with peers
but no secret. A datagram with a wrong tag or a malformed body is dropped and counted; a placement
naming a pool or endpoint this process does not have is ignored (mid-rollout configs differ).

Rotating the secret. Processes that hold different secrets drop each other's datagrams, and a
rolling update runs old and new pods side by side. So a process also accepts datagrams signed with
the secret in ``gossip.also_accepted_env``, if set, and never signs with it. Three rolling updates
then replace the secret with none dropped: accept the new secret; sign with the new one and accept
the old; stop accepting the old. At every moment of each, every process accepts what every other
signs. Only a datagram under the second secret pays for a second HMAC: 3 µs for 1 KB, 15 µs for
a full 8 KB datagram (``timeit``).

Cost. Per request sent: about 0.3 µs to queue its placement and 0.4 µs to encode and sign it, then
one ``sendto`` per peer for every ``gossip.max_datagram_bytes`` of placements (a placement is about
20 bytes plus 9 per prompt block, at most 128 blocks with the default prefix cap). Per placement
received: about 0.8 µs to verify and decode, plus what ``observe`` costs for a request sent here
(``PrefixIndex.record``, about 0.15 µs per block), so each process indexes the whole region's
traffic, not its share of it. (``timeit``, placements of 4 blocks, 64 to a datagram; a request
costs the gateway about 200 µs, README "Performance".) Loads, with a pool of 8 endpoints: a tick
with nothing new to report costs 1.6 µs; one that reports costs 8 µs plus a ``sendto`` per peer
(172 bytes), and receiving a report costs 8 µs. At most one report per ``gossip.interval_s`` per
peer: under 0.05 % of a core per peer at the default 20 ms.

Loads, measured (routing benchmark, 8 replicas, ``ring_load_factor = 1.0``, hh-rlhf and Mooncake,
two sittings ten minutes apart): two workers that shared placements only spread their load 1.39
and 1.38 (max/mean busy), where one process spread it 1.24 and 1.27; sharing loads as well, 1.26
and 1.27, where one process spread it 1.22 and 1.23. Hit ratios did not move beyond run-to-run noise.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgspec

from gateway import listeners
from gateway.metrics import Metrics
from gateway.picker import Policy, RouteKeys
from gateway.pool import Endpoint, Pool
from gateway.settings import Gossip as GossipConfig
from gateway.settings import is_ipv6, peer_address

log = logging.getLogger("gateway.gossip")

TAG_BYTES = 16
# msgpack bytes of a placement beyond its strings and block keys, and of a datagram's envelope.
PLACEMENT_OVERHEAD = 24
LOAD_OVERHEAD = 16
DATAGRAM_OVERHEAD = 16
MIN_SECRET_BYTES = 16
# A process reports its loads when they change, and at least this often; a peer's report older than
# LOAD_EXPIRY_S is forgotten (the process died or left).
LOAD_REFRESH_S = 1.0
LOAD_EXPIRY_S = 3 * LOAD_REFRESH_S
LOOPBACK = "127.0.0.1"


class Placement(msgspec.Struct, array_like=True, frozen=True):
    """One request's placement: ``endpoint`` of pool ``pool`` received a prompt with block keys
    ``prefix`` (``affinity.prefix_hashes``) for session ``session`` (``affinity.key_hash``, or None)."""

    pool: str
    endpoint: str
    prefix: list[int]
    session: int | None = None
    opening: bool = False


class Load(msgspec.Struct, array_like=True, frozen=True):
    """The sender's requests in flight at ``endpoint`` of pool ``pool`` when it sent this."""

    pool: str
    endpoint: str
    in_flight: int


class Datagram(msgspec.Struct, array_like=True):
    sender: int
    placements: list[Placement]
    # Last, with a default: an older peer's datagram decodes with none, and an older peer ignores them.
    loads: list[Load] = []


class Codec:
    """Signed msgpack datagrams: ``tag (16 bytes) || msgpack(Datagram)``, signed with the first of
    ``secrets`` and accepted under any of them (module docstring, "Trust")."""

    def __init__(self, secrets: Sequence[bytes], max_datagram_bytes: int):
        self.secrets = tuple(secrets)
        self.max_datagram_bytes = max_datagram_bytes
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(Datagram).decode

    def encode(self, sender: int, placements: Iterable[Placement]) -> Iterator[bytes]:
        """Datagrams of at most ``max_datagram_bytes`` holding ``placements`` in order. A placement
        too long for one datagram on its own keeps the first blocks that fit: a shorter prefix of a
        prompt is still true of the endpoint."""
        room = self.max_datagram_bytes - TAG_BYTES - DATAGRAM_OVERHEAD
        sized = []
        for p in placements:
            fixed = PLACEMENT_OVERHEAD + len(p.pool) + len(p.endpoint)
            if fixed + 9 * len(p.prefix) > room:
                p = msgspec.structs.replace(p, prefix=p.prefix[:max(0, (room - fixed) // 9)])
            sized.append((p, fixed + 9 * len(p.prefix)))
        for batch in _batches(sized, room):
            yield self._seal(Datagram(sender, batch))

    def encode_loads(self, sender: int, loads: Iterable[Load]) -> Iterator[bytes]:
        """Datagrams of at most ``max_datagram_bytes`` holding ``loads`` in order."""
        room = self.max_datagram_bytes - TAG_BYTES - DATAGRAM_OVERHEAD
        sized = [(load, LOAD_OVERHEAD + len(load.pool) + len(load.endpoint)) for load in loads]
        for batch in _batches(sized, room):
            yield self._seal(Datagram(sender, [], batch))

    def decode(self, data: bytes) -> Datagram:
        """The datagram, or ``ValueError`` naming why it is refused (``signature``, ``malformed``)."""
        tag, body = data[:TAG_BYTES], data[TAG_BYTES:]
        if len(tag) < TAG_BYTES or not any(hmac.compare_digest(tag, _tag(secret, body))
                                            for secret in self.secrets):
            raise ValueError("signature")
        try:
            return self._decode(body)
        except msgspec.DecodeError:
            raise ValueError("malformed") from None

    def sign(self, body: bytes) -> bytes:
        """``body`` (msgpack) as a datagram: its tag under the first secret, then the body."""
        return _tag(self.secrets[0], body) + body

    def _seal(self, datagram: Datagram) -> bytes:
        return self.sign(self._encode(datagram))


def _tag(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()[:TAG_BYTES]


def _batches(sized: list[tuple[Any, int]], room: int) -> Iterator[list[Any]]:
    """The items of ``(item, bytes)`` pairs in order, in lists of at most ``room`` bytes each."""
    batch: list[Any] = []
    size = 0
    for item, cost in sized:
        if size + cost > room and batch:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += cost
    if batch:
        yield batch


class SharedPolicy:
    """A pool's policy whose placements also go to the outbox. ``pick`` and ``forget`` are the
    inner policy's own bound methods: sharing adds nothing to routing a request."""

    __slots__ = ("_outbox", "forget", "inner", "name", "pick", "pool")

    def __init__(self, inner: Policy, pool: str, outbox: Outbox):
        self.inner = inner
        self.pool = pool
        self.name = inner.name
        self.pick = inner.pick
        self.forget = inner.forget
        self._outbox = outbox

    def observe(self, endpoint_id: str, keys: RouteKeys, now: float) -> None:
        self.inner.observe(endpoint_id, keys, now)
        self._outbox.add(self.pool, endpoint_id, keys)


class Outbox:
    """Placements waiting for the next send; the first one of a batch schedules it."""

    def __init__(self, interval_s: float, send):
        self.interval_s = interval_s
        self.pending: list[Placement] = []
        self._send = send
        self._timer: asyncio.TimerHandle | None = None

    def add(self, pool: str, endpoint_id: str, keys: RouteKeys) -> None:
        self.pending.append(Placement(pool, endpoint_id, keys.prefix, keys.session, keys.opening))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self.flush)

    def flush(self) -> None:
        self._timer = None
        batch, self.pending = self.pending, []
        if batch:
            self._send(batch)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Siblings(msgspec.Struct, frozen=True):
    """The loopback gossip sockets a supervisor bound for its workers: this worker's inherited file
    descriptor, and the ports of all of them (its own included)."""

    fd: int
    ports: tuple[int, ...]

    def argument(self) -> str:
        """The worker's command-line form of this, read back by :meth:`parse`."""
        return f"{self.fd}:{','.join(map(str, self.ports))}"

    @classmethod
    def parse(cls, argument: str) -> Siblings:
        fd, _, ports = argument.partition(":")
        return cls(int(fd), tuple(int(p) for p in ports.split(",")))


class Gossip(asyncio.DatagramProtocol):
    """The UDP listener, the peer list and the outbox of one process (module docstring)."""

    def __init__(self, config: GossipConfig, pools: list[Pool], metrics: Metrics, secrets: Sequence[bytes],
                 refresh_s: float, worker: int = 0, workers: int = 1, siblings: Siblings | None = None):
        self.config = config
        # Listening on IPv6 and IPv4 both: peers are looked up in both, and IPv4 ones sent to as mapped.
        self.dual_stack = is_ipv6(config.host)
        self.metrics = metrics
        self.refresh_s = refresh_s
        self.port = config.port + worker
        self.workers = workers
        self.siblings = siblings
        self.sender = random.getrandbits(63)
        self.codec = Codec(secrets, config.max_datagram_bytes)
        self.outbox = Outbox(config.interval_s, self._send)
        self.peers: list[tuple[str, int]] = []
        self._policies: dict[str, Policy] = {}
        self._pools = {pool.name: pool for pool in pools}
        self._reported: list[Load] = []  # the last load report sent ...
        self._reported_at = -LOAD_REFRESH_S  # ... and when
        # (pool, endpoint id) -> sender -> (its requests in flight there, when its report arrived)
        self._peer_loads: dict[tuple[str, str], dict[int, tuple[int, float]]] = {}
        for pool in pools:
            if pool.policy.name in ("prefix", "session"):  # the others learn nothing from placements
                self._policies[pool.name] = pool.policy
                pool.policy = SharedPolicy(pool.policy, pool.name, self.outbox)
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Task] = []
        self._lookup_failing = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.siblings is not None:
            sock = socket.socket(fileno=self.siblings.fd)
            self.port = sock.getsockname()[1]
            self._transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
            self.peers = [(LOOPBACK, port) for port in self.siblings.ports]
            self.metrics.gossip_peers.set(len(self.peers))
        else:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: self, sock=listeners.bind(self.config.host, self.port, socket.SOCK_DGRAM))
            await self.refresh_peers()
            self._tasks.append(loop.create_task(self._refresh_loop()))
        self._tasks.append(loop.create_task(self._load_loop()))
        log.info("gossip listening", extra={"fields": {"port": self.port, "peers": len(self.peers)}})

    async def stop(self) -> None:
        """Send what is pending (a draining process's last placements and loads still help its
        peers), then close."""
        for task in self._tasks:
            task.cancel()
        self.outbox.cancel()
        self.outbox.flush()
        self.report_loads(time.monotonic())
        if self._transport is not None:
            self._transport.close()

    # Sending

    def _send(self, batch: list[Placement]) -> None:
        if self._broadcast(self.codec.encode(self.sender, batch)):
            self.metrics.child(self.metrics.gossip_placements, "sent").inc(len(batch))

    def report_loads(self, now: float) -> None:
        """Send this process's requests in flight per endpoint, if they changed since the last
        report or that is ``LOAD_REFRESH_S`` old (a peer forgets reports older than
        ``LOAD_EXPIRY_S``: those of a process that died)."""
        loads = [Load(name, ep.id, ep.in_flight)
                 for name, pool in self._pools.items() for ep in pool.endpoints]
        if loads == self._reported and now - self._reported_at < LOAD_REFRESH_S:
            return
        if self._broadcast(self.codec.encode_loads(self.sender, loads)):
            self._reported, self._reported_at = loads, now
            self.metrics.child(self.metrics.gossip_load_reports, "sent").inc()

    def _broadcast(self, datagrams: Iterable[bytes]) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        for datagram in datagrams:
            for peer in self.peers:
                try:
                    transport.sendto(datagram, peer)
                except OSError:
                    self.metrics.child(self.metrics.gossip_dropped, "send_error").inc()
        return True

    async def _load_loop(self) -> None:
        expired_at = time.monotonic()
        while True:
            await asyncio.sleep(self.config.interval_s)
            now = time.monotonic()
            self.report_loads(now)
            if now - expired_at >= LOAD_REFRESH_S:
                expired_at = now
                self._expire_loads(now)

    # Receiving

    def datagram_received(self, data: bytes, addr) -> None:
        m = self.metrics
        try:
            datagram = self.codec.decode(data)
        except ValueError as e:
            m.child(m.gossip_dropped, str(e)).inc()
            return
        if datagram.sender == self.sender:
            return
        now = time.monotonic()
        if datagram.loads:
            self._apply_loads(datagram.sender, datagram.loads, now)
        applied = ignored = 0
        for p in datagram.placements:
            policy = self._policies.get(p.pool)
            if policy is None or not any(e.id == p.endpoint for e in self._pools[p.pool].endpoints):
                ignored += 1
                continue
            policy.observe(p.endpoint, RouteKeys(p.prefix, p.session, p.opening), now)
            applied += 1
        if applied:
            m.child(m.gossip_placements, "received").inc(applied)
        if ignored:
            m.child(m.gossip_placements, "ignored").inc(ignored)

    def _apply_loads(self, sender: int, loads: list[Load], now: float) -> None:
        by_id: dict[str, dict[str, Endpoint]] = {}
        for load in loads:
            key = (load.pool, load.endpoint)
            reports = self._peer_loads.setdefault(key, {})
            reports[sender] = (load.in_flight, now)
            self._sum_reports(key, reports, by_id)
        self.metrics.child(self.metrics.gossip_load_reports, "received").inc()

    def _expire_loads(self, now: float) -> None:
        """Forget the reports older than ``LOAD_EXPIRY_S`` and sum the rest anew (which also
        counts them at endpoints that discovery has replaced since)."""
        by_id: dict[str, dict[str, Endpoint]] = {}
        for key, reports in list(self._peer_loads.items()):
            for sender in [s for s, (_, at) in reports.items() if now - at > LOAD_EXPIRY_S]:
                del reports[sender]
            if not reports:
                del self._peer_loads[key]
            self._sum_reports(key, reports, by_id)

    def _sum_reports(self, key: tuple[str, str], reports: dict[int, tuple[int, float]],
                     by_id: dict[str, dict[str, Endpoint]]) -> None:
        """Set the ``peer_in_flight`` of endpoint ``key`` (pool, id) of this process, if it has
        it, to the sum of ``reports``; ``by_id`` caches each pool's endpoints for one batch."""
        pool_name, endpoint_id = key
        endpoints = by_id.get(pool_name)
        if endpoints is None:
            pool = self._pools.get(pool_name)
            endpoints = by_id[pool_name] = {ep.id: ep for ep in pool.endpoints} if pool is not None else {}
        ep = endpoints.get(endpoint_id)
        if ep is not None:
            ep.peer_in_flight = sum([n for n, _ in reports.values()])

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that is not (yet) listening: expected while pods roll.
        self.metrics.child(self.metrics.gossip_dropped, "send_error").inc()

    # Peers

    async def refresh_peers(self) -> None:
        """Resolve ``gossip.peers``; a failed lookup keeps that entry's last addresses."""
        loop = asyncio.get_running_loop()
        addresses: list[tuple[str, int]] = []
        failed = []
        for entry in self.config.peers:
            address = peer_address(entry)
            assert address is not None  # validated at load
            host, port = address
            try:
                ips = [host] if _is_ip(host) else sorted({info[4][0] for info in await loop.getaddrinfo(
                    host, port, family=socket.AF_UNSPEC if self.dual_stack else socket.AF_INET,
                    type=socket.SOCK_DGRAM)})
                if self.dual_stack:
                    ips = [_mapped(ip) for ip in ips]
            except OSError as e:
                failed.append((entry, str(e)))
                ips = sorted({ip for ip, p in self.peers if port <= p < port + self.workers})
            addresses += [(ip, port + i) for ip in ips for i in range(self.workers)]
        if failed and not self._lookup_failing:
            log.warning("gossip peer lookup failed; keeping the last addresses",
                        extra={"fields": {"failures": failed}})
        elif self._lookup_failing and not failed:
            log.info("gossip peer lookup recovered", extra={"fields": {"peers": len(addresses)}})
        self._lookup_failing = bool(failed)
        if failed:
            self.metrics.gossip_lookup_failures.inc(len(failed))
        self.peers = sorted(set(addresses))
        self.metrics.gossip_peers.set(len(self.peers))

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh_peers()


def _mapped(ip: str) -> str:
    """An address as a dual-stack socket sends to it: an IPv4 one as ``::ffff:a.b.c.d``."""
    return f"::ffff:{ip}" if "." in ip and ":" not in ip else ip


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def bind_siblings(workers: int) -> list[socket.socket]:
    """One loopback UDP socket per worker, bound by the supervisor before any worker starts and
    kept open for restarted workers to inherit."""
    socks = []
    for _ in range(workers):
        socks.append(listeners.bind(LOOPBACK, 0, socket.SOCK_DGRAM))
    return socks


def secrets_from_env(config: GossipConfig, environ: dict[str, str] | None = None) -> list[bytes]:
    """The secret that signs, then the one also accepted if set; ``SystemExit`` naming the variable
    when the first is missing or either is short."""
    environ = os.environ if environ is None else environ
    secret = environ.get(config.secret_env, "").encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise SystemExit(f"edge-gateway: `gossip.peers` is set, so environment variable {config.secret_env} must "
                         f"hold the gossip secret shared by all gateway processes (at least {MIN_SECRET_BYTES} bytes)")
    also = environ.get(config.also_accepted_env, "").encode()
    if also and len(also) < MIN_SECRET_BYTES:
        raise SystemExit(f"edge-gateway: environment variable {config.also_accepted_env} holds a gossip secret "
                         f"shorter than {MIN_SECRET_BYTES} bytes")
    return [secret, also] if also else [secret]


