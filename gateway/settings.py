"""The gateway's one configuration: a frozen msgspec Struct tree, loaded from TOML plus environment.

Every default lives here and nowhere else. Loading is three steps, each of which names the bad key
when it fails:

1. parse the TOML file (or start from an empty table);
2. apply environment overrides: ``EDGE_GATEWAY__<SECTION>__<KEY>=value`` sets ``[section] key``; list
   items are addressed by index (``EDGE_GATEWAY__POOLS__0__ENDPOINTS='["http://10.0.0.7:30000"]'``).
   A value is read as JSON when it parses as JSON, otherwise as a plain string;
3. convert into :class:`Settings` (unknown keys and wrong types are errors) and check the rules a
   type cannot express (ports in range, endpoint URLs, every model served by some pool, ...).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

ENV_PREFIX = "EDGE_GATEWAY__"

EngineKind = Literal["sglang", "vllm"]
Role = Literal["interactive", "batch"]
PolicyName = Literal["prefix", "session", "round_robin", "random", "least_load", "power_of_two"]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Listener(_Section):
    # An IPv6 address ("::") serves IPv6 and IPv4 clients both (gateway/listeners.py).
    host: str = "0.0.0.0"
    port: int = 8080
    # Serve GET /metrics on the public port as well as on the admin port.
    public_metrics: bool = True


class AdminListener(_Section):
    # Loopback by default: the admin API can eject endpoints and drain the process. "::" is dual
    # stack, as for the public listener.
    host: str = "127.0.0.1"
    port: int = 9090


class Pool(_Section):
    name: str
    engine: EngineKind
    role: Role
    models: list[str]
    # The replicas: fixed URLs (http://host:port), or `srv`, a DNS SRV name whose targets are the
    # replicas, re-read every `discovery.interval_s` (gateway/discovery.py). Exactly one of the two.
    endpoints: list[str] = msgspec.field(default_factory=list)
    srv: str | None = None
    # None picks the role's default: prefix-aware for interactive pools, the less loaded of two random
    # replicas for batch pools (least-load herds when several gateway processes share stale engine
    # load; gateway/picker.py).
    policy: PolicyName | None = None
    # Credential the gateway presents to the engines; the client's own key never reaches them.
    api_key: str | None = None
    health_path: str = "/health"
    metrics_path: str = "/metrics"
    # Requests in flight per replica from this process: aim below target, never above max (beyond
    # max, requests wait in the pool's queue). Batch pools with large batches want larger values.
    target_in_flight: int = 32
    max_in_flight: int = 64
    # Hedging (gateway/relay.py): a request with no first byte this many seconds after it was sent
    # is sent to a second replica as well, and the first to answer is relayed. None: never. Paid
    # from the retry budget. Set it above the pool's normal TTFT p99, or it doubles the load it meets.
    hedge_after_s: float | None = None

    @property
    def effective_policy(self) -> str:
        return self.policy or ("prefix" if self.role == "interactive" else "power_of_two")


class Timeouts(_Section):
    connect_s: float = 2.0
    # Until the first response byte of one attempt (queueing + prefill of a long prompt).
    first_byte_s: float = 60.0
    # Between two reads of a response body; streams have no total timeout.
    idle_s: float = 30.0
    # Whole request head and body must arrive within this (slowloris guard).
    request_read_s: float = 10.0
    keepalive_s: float = 75.0
    # SIGTERM: how long running streams may take to finish.
    drain_s: float = 30.0


class Limits(_Section):
    max_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_connections: int = 20000
    # Request body bytes all connections together may hold while bodies are still arriving (503 past it).
    max_buffered_body_bytes: int = 16 * 1024 * 1024
    # Idle keep-alive connections kept per endpoint.
    upstream_idle_per_endpoint: int = 256
    # Attempts per request (first try + retries on other endpoints, before commit only).
    max_attempts: int = 2
    # Host names (and their subdomains) whose https media URLs may reach the engines; data: URIs
    # are always allowed. Empty: data: URIs only.
    media_url_allowlist: list[str] = msgspec.field(default_factory=list)


class Routing(_Section):
    # About 64 tokens of English text: long enough to group, short enough to tell prompts apart.
    block_chars: int = 256
    max_prefix_chars: int = 32768
    load_factor: float = 1.25
    # Extra in-flight requests a session's endpoint may keep beyond its load bound: moving a
    # conversation costs a whole prefill, a few extra requests in flight cost little.
    session_slack: float = 2.0
    vnodes: int = 160
    ring_key_blocks: int = 2
    # Cold prefixes and new sessions go to the least loaded of the first `ring_choices` members of
    # their ring order, within `ring_load_factor` x mean load (`load_factor` bounds what placed work
    # keeps). 2 and 1.0 balance new work best, and leave the holders more room for their hits
    # (README, "Routing defaults"), but a cold prefix or new session then often lands off its ring
    # owner, where a process that never heard of it looks. Processes that gossip hear of it: the
    # workers of one gateway do by default, gateway pods when `gossip.peers` names them. Pods that
    # share clients without gossip need 1 and 1.25, the deterministic owner every process agrees on.
    ring_choices: int = 2
    ring_load_factor: float = 1.0
    index_capacity_blocks: int = 262144
    index_ttl_s: float = 600.0
    session_headers: list[str] = msgspec.field(default_factory=lambda: ["x-session-id"])
    session_fields: list[str] = msgspec.field(default_factory=lambda: ["user"])
    session_capacity: int = 100000
    session_ttl_s: float = 3600.0
    max_candidates: int = 3
    # Interactive traffic may spill to the batch pool only when this is on.
    interactive_spill: bool = False
    # Batch traffic may borrow the interactive pool while its load per endpoint is under this.
    batch_borrow_below: float = 0.5
    # Debug: name the chosen endpoint in an x-gateway-endpoint response header.
    endpoint_header: bool = False


class Health(_Section):
    interval_s: float = 5.0
    timeout_s: float = 2.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 1
    scrape_interval_s: float = 1.0
    scrape_stale_s: float = 5.0
    # KV usage (0-1, from the engine's metrics) from which an engine takes no new work (cold
    # prefixes, new sessions) while another endpoint of its pool has room: past it, engines queue
    # or preempt, and preempted requests prefill again. Its prefix hits and sessions stay.
    kv_saturation: float = 0.9


class Discovery(_Section):
    """How pools with an `srv` name find their replicas (see gateway/discovery.py)."""

    interval_s: float = 10.0
    # One lookup, retries over the nameservers included.
    timeout_s: float = 2.0
    # "host" or "host:port" (port 53 when omitted). Empty: the system's resolver configuration
    # (/etc/resolv.conf), which in Kubernetes is the cluster DNS.
    nameservers: list[str] = msgspec.field(default_factory=list)


class Gossip(_Section):
    """Placement and load sharing between gateway processes (see gateway/gossip.py)."""

    # "host:port" of the gossip listeners of every gateway process of the region, this one's
    # included; a host name (the gateway's headless Service) stands for all its addresses and is
    # resolved every `discovery.interval_s`. Empty: no gossip between gateway processes, but see
    # `between_workers`.
    peers: list[str] = msgspec.field(default_factory=list)
    # With --workers N and no `peers`, the workers gossip among themselves over loopback sockets
    # the supervisor binds, signed with a secret it draws at start: nothing to configure, no port
    # to reserve. With `peers`, workers share through those instead.
    between_workers: bool = True
    # An IPv6 address ("::") listens on IPv6 and IPv4 both, and reaches peers by either (IPv6-only
    # and dual-stack clusters); an IPv4 one reaches IPv4 peers only.
    host: str = "0.0.0.0"
    # UDP; with --workers N, worker i listens on port + i.
    port: int = 7946
    # How long a placement may wait for the next datagram to its peers, and how often a process
    # reports its requests in flight per endpoint when they changed.
    interval_s: float = 0.02
    # Below the path MTU would avoid IP fragmentation on pod networks; 8 KB holds about 7
    # placements of 128 blocks, or a few hundred of short prompts.
    max_datagram_bytes: int = 8192
    # Environment variable holding the secret that signs datagrams (required with peers).
    secret_env: str = "EDGE_GATEWAY_GOSSIP_SECRET"
    # Environment variable holding a second secret that datagrams are accepted under but never signed
    # with: what lets the secret be rotated without dropping any (infra/README.md has the steps).
    # Unset or empty: only `secret_env`'s.
    also_accepted_env: str = "EDGE_GATEWAY_GOSSIP_SECRET_ALSO_ACCEPTED"


class Admission(_Section):
    """Bounded wait queues per pool and traffic class (see gateway/admission.py)."""

    interactive_queue: int = 256
    interactive_wait_s: float = 2.0
    batch_queue: int = 4096
    batch_wait_s: float = 60.0


class Outlier(_Section):
    """Passive health from live traffic (see gateway/outlier.py)."""

    consecutive_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejected_percent: float = 50.0
    # Below this share of available replicas a pool routes over all its healthy replicas.
    panic_threshold_percent: float = 50.0
    slow_start_s: float = 30.0
    min_weight: float = 0.1


class RetryBudget(_Section):
    """Retries before commit are paid from a budget, so a brownout cannot become a retry storm:
    every request adds ``ratio`` of a retry, time adds ``min_per_s``, the balance is capped at ``cap``."""

    ratio: float = 0.2
    min_per_s: float = 1.0
    cap: float = 10.0


class Auth(_Section):
    # Keys file (JSON lines) of HMAC-SHA256 digests (see gateway/auth.py, `python -m gateway.keys`).
    # None: authentication is off and the network is the only guard.
    keys_file: str | None = None
    # Environment variable holding the server-side pepper of the digests (never in a file).
    pepper_env: str = "EDGE_GATEWAY_KEY_PEPPER"


class Logging(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    # Log output waiting for a slow reader of stdout/stderr; beyond it, lines are dropped and counted
    # (gateway_log_lines_dropped_total) rather than stall requests (gateway/logs.py, Output).
    max_pending_bytes: int = 8 * 1024 * 1024


class Settings(_Section):
    region: str = "local"
    workers: int = 1
    listen: Listener = msgspec.field(default_factory=Listener)
    admin: AdminListener = msgspec.field(default_factory=AdminListener)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    limits: Limits = msgspec.field(default_factory=Limits)
    routing: Routing = msgspec.field(default_factory=Routing)
    health: Health = msgspec.field(default_factory=Health)
    discovery: Discovery = msgspec.field(default_factory=Discovery)
    gossip: Gossip = msgspec.field(default_factory=Gossip)
    outlier: Outlier = msgspec.field(default_factory=Outlier)
    admission: Admission = msgspec.field(default_factory=Admission)
    retry_budget: RetryBudget = msgspec.field(default_factory=RetryBudget)
    auth: Auth = msgspec.field(default_factory=Auth)
    logging: Logging = msgspec.field(default_factory=Logging)
    pools: list[Pool] = msgspec.field(default_factory=list)

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for pool in self.pools:
            seen.update(dict.fromkeys(pool.models))
        return list(seen)


class SettingsError(ValueError):
    """Raised with a message that names the offending key."""


def load(path: str | None = None, environ: dict[str, str] | None = None,
         workers: int | None = None) -> Settings:
    """The file, then the environment's EDGE_GATEWAY__* over it, then the command line's
    ``--workers`` over both; validated as a whole."""
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SettingsError(f"cannot read config {path}: {e}") from None
    _apply_env(raw, os.environ if environ is None else environ)
    if workers is not None:
        raw["workers"] = workers
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise SettingsError(f"invalid config: {e}") from None
    _validate(settings)
    return settings


def _apply_env(raw: dict[str, Any], environ: dict[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        try:
            parsed: Any = msgspec.json.decode(value)
        except msgspec.DecodeError:
            parsed = value
        node: Any = raw
        for i, key in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(node, list):
                idx = _index(key, name)
                while len(node) <= idx:
                    node.append({})
                node = node[idx]
            else:
                node = node.setdefault(key, [] if nxt.isdigit() else {})
        if isinstance(node, list):
            idx = _index(path[-1], name)
            while len(node) <= idx:
                node.append({})
            node[idx] = parsed
        else:
            node[path[-1]] = parsed


def _index(key: str, name: str) -> int:
    if not key.isdigit():
        raise SettingsError(f"{name}: expected a list index, got {key!r}")
    return int(key)


def _validate(s: Settings) -> None:
    def bad(key: str, why: str) -> SettingsError:
        return SettingsError(f"invalid config: `{key}` {why}")

    for key, port in (("listen.port", s.listen.port), ("admin.port", s.admin.port)):
        if not 0 <= port <= 65535:
            raise bad(key, f"must be a TCP port (0-65535), got {port}")
    if s.workers < 1:
        raise bad("workers", "must be at least 1")
    for section in ("timeouts", "limits", "health", "discovery", "outlier", "admission"):
        for field, value in msgspec.structs.asdict(getattr(s, section)).items():
            if isinstance(value, (int, float)) and value <= 0:
                raise bad(f"{section}.{field}", f"must be positive, got {value}")
    if s.logging.max_pending_bytes <= 0:
        raise bad("logging.max_pending_bytes", f"must be positive, got {s.logging.max_pending_bytes}")
    o = s.outlier
    for key in ("max_ejected_percent", "panic_threshold_percent"):
        if getattr(o, key) > 100:
            raise bad(f"outlier.{key}", "is a percentage (0-100]")
    if o.min_weight > 1:
        raise bad("outlier.min_weight", "must be in (0, 1]")
    if s.health.kv_saturation > 1:
        raise bad("health.kv_saturation", f"is a share of the KV cache, in (0, 1]; got {s.health.kv_saturation}")
    b = s.retry_budget
    if b.ratio < 0 or b.min_per_s < 0 or b.cap < 0:
        raise bad("retry_budget", "ratio, min_per_s and cap must be >= 0")
    r = s.routing
    for field in ("load_factor", "ring_load_factor"):
        if getattr(r, field) < 1.0:
            raise bad(f"routing.{field}", f"must be >= 1.0, got {getattr(r, field)}")
    for field in ("block_chars", "max_prefix_chars", "vnodes", "ring_key_blocks", "ring_choices", "index_capacity_blocks",
                  "session_capacity", "max_candidates"):
        if getattr(r, field) < 1:
            raise bad(f"routing.{field}", "must be at least 1")
    names: set[str] = set()
    for i, pool in enumerate(s.pools):
        where = f"pools[{i}]"
        if pool.name in names:
            raise bad(f"{where}.name", f"duplicates pool name {pool.name!r}")
        names.add(pool.name)
        if not pool.models:
            raise bad(f"{where}.models", "must name at least one model")
        if pool.srv is not None:
            if pool.endpoints:
                raise bad(f"{where}.srv", "and `endpoints` exclude each other: replicas come from one or the other")
            if not _is_srv_name(pool.srv):
                raise bad(f"{where}.srv", f"must be a DNS SRV name like _http._tcp.service.namespace.svc, got {pool.srv!r}")
        elif not pool.endpoints:
            raise bad(f"{where}.endpoints", "must list at least one endpoint URL (or set `srv`)")
        for j, url in enumerate(pool.endpoints):
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname or not parts.port or parts.path not in ("", "/"):
                raise bad(f"{where}.endpoints[{j}]", f"must look like http://host:port, got {url!r}")
        if not 1 <= pool.target_in_flight <= pool.max_in_flight:
            raise bad(f"{where}.target_in_flight", "must be between 1 and max_in_flight")
        if pool.hedge_after_s is not None and not 0 < pool.hedge_after_s < s.timeouts.first_byte_s:
            raise bad(f"{where}.hedge_after_s", f"must be between 0 and timeouts.first_byte_s "
                      f"({s.timeouts.first_byte_s:g}), exclusive; got {pool.hedge_after_s:g}")
        for key in ("health_path", "metrics_path"):
            if not getattr(pool, key).startswith("/"):
                raise bad(f"{where}.{key}", "must start with /")
    g = s.gossip
    if not 0 < g.port <= 65535 - (s.workers - 1):
        raise bad("gossip.port", f"must leave room for one UDP port per worker (1-{65535 - s.workers + 1}), "
                  f"got {g.port}")
    if g.interval_s <= 0:
        raise bad("gossip.interval_s", f"must be positive, got {g.interval_s}")
    if not 512 <= g.max_datagram_bytes <= 65000:
        raise bad("gossip.max_datagram_bytes", f"must be between 512 and 65000, got {g.max_datagram_bytes}")
    for i, entry in enumerate(g.peers):
        address = peer_address(entry)
        if address is None:
            raise bad(f"gossip.peers[{i}]", f"must look like host:port ([address]:port for IPv6), got {entry!r}")
        if is_ipv6(address[0]) and not is_ipv6(g.host):
            raise bad(f"gossip.peers[{i}]", f"is an IPv6 address, which needs gossip.host to be one too "
                      f"(\"::\" listens on IPv6 and IPv4), got host {g.host!r}")
    for i, server in enumerate(s.discovery.nameservers):
        if nameserver(server) is None:
            raise bad(f"discovery.nameservers[{i}]", f"must be an IP address, optionally with :port, got {server!r}")


def _is_srv_name(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return (len(labels) >= 3 and labels[0].startswith("_") and labels[1] in ("_tcp", "_udp")
            and all(0 < len(label) <= 63 for label in labels))


def peer_address(entry: str) -> tuple[str, int] | None:
    """(host, port) of a `gossip.peers` entry ("10.0.0.7:7946", "[fd00::7]:7946",
    "edge-gateway-peers.inference:7946"), or None if it is not one."""
    host, sep, port = entry.rpartition(":")
    if host.startswith("[") and host.endswith("]") and is_ipv6(host[1:-1]):
        host = host[1:-1]
    elif ":" in host:  # an IPv6 address without brackets: where its port starts is a guess
        return None
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        return None
    return host, int(port)


def is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def nameserver(server: str) -> tuple[str, int] | None:
    """(address, port) of a `discovery.nameservers` entry ("10.0.0.10", "10.0.0.10:53", "[fd00::a]:53"),
    or None if it is not one."""
    if server.startswith("["):
        host, _, port = server[1:].partition("]")
        port = port.removeprefix(":") or "53"
    elif server.count(":") == 1:
        host, _, port = server.partition(":")
    else:
        host, port = server, "53"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    if not port.isdigit() or not 0 < int(port) <= 65535:
        return None
    return host, int(port)
