"""Endpoints (engine replicas) and the pools that group them by engine kind, role and models.

An :class:`Endpoint` carries everything routing reads about a replica: its in-flight count in this
process, what the engine itself last reported (running and queued requests, KV usage, and whether
that usage marks its KV cache as saturated), its health, and its slow-start weight. Health and
scrapes update these fields; the picker only reads them. A pool's replicas are fixed by its
``endpoints`` or, for a pool with an ``srv`` name, replaced as DNS changes (``discovery.py``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from gateway import settings as cfg


class Endpoint:
    __slots__ = ("id", "pool", "host", "port", "in_flight", "healthy", "ejected_until", "panic", "available",
                 "weight", "peer_in_flight", "engine_foreign", "engine_kv_usage", "engine_seen_at",
                 "saturated", "signal_stale")

    def __init__(self, url: str, pool: str):
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        # As a URL writes it (an IPv6 address in brackets): health checks and scrapes build their URLs
        # from it.
        self.id = f"[{self.host}]:{parts.port}" if ":" in self.host else f"{self.host}:{parts.port}"
        self.pool = pool
        self.port = parts.port or 80
        self.in_flight = 0
        self.healthy = False  # until the first health check passes
        self.ejected_until = 0.0  # set and cleared by outlier detection
        self.panic = False  # the pool is in panic mode: ejections are ignored
        # Derived from the three above by refresh(), kept as a plain attribute because the picker
        # reads it for every endpoint on every request.
        self.available = False
        self.weight = 1.0  # slow start: below 1 while a returning replica ramps up
        self.peer_in_flight = 0  # what gateway processes that gossip (gateway/gossip.py) last reported
        # Running + queued at the engine that are neither this process's nor its peers' (as of the
        # last scrape): other processes' that do not gossip, or requests the engine still holds.
        self.engine_foreign = 0.0
        self.engine_kv_usage = 0.0
        self.engine_seen_at = 0.0
        # The engine's last fresh scrape put its KV usage at or above `health.kv_saturation`.
        self.saturated = False
        # No fresh scrape within `health.scrape_stale_s`: the engine_* fields are last known values.
        # None until the health checker's first pass, which therefore reports every endpoint's state.
        self.signal_stale: bool | None = None

    def refresh(self) -> None:
        self.available = self.healthy and (self.panic or not self.ejected_until)

    @property
    def load(self) -> float:
        """Requests this process has in flight there, plus its gossip peers', plus the rest of what
        the engine last reported."""
        return self.in_flight + self.peer_in_flight + self.engine_foreign

    def __repr__(self) -> str:
        return f"Endpoint({self.id}, pool={self.pool}, in_flight={self.in_flight}, healthy={self.healthy})"


class Pool:
    __slots__ = ("name", "engine", "role", "models", "endpoints", "policy", "config", "auth_header", "panic")

    def __init__(self, config: cfg.Pool, policy):
        self.config = config
        self.name = config.name
        self.engine = config.engine
        self.role = config.role
        self.models = frozenset(config.models)
        self.endpoints = [Endpoint(url, config.name) for url in config.endpoints]
        self.policy = policy
        self.panic = False
        self.auth_header = (b"authorization: Bearer " + config.api_key.encode() + b"\r\n"
                            if config.api_key else b"")

    def replace_endpoints(self, found: list[Endpoint]) -> tuple[list[Endpoint], list[Endpoint]]:
        """Make ``found`` the pool's replicas; returns (joined, left). A replica already in the pool keeps
        its Endpoint, and with it its health, load and in-flight count. The list is replaced, never
        edited in place, so a request that holds the old list finishes with it."""
        current = {e.id: e for e in self.endpoints}
        chosen: dict[str, Endpoint] = {}
        joined: list[Endpoint] = []
        for ep in found:
            if ep.id in chosen:
                continue
            kept = current.pop(ep.id, None)
            if kept is None:
                ep.panic = self.panic
                ep.refresh()
                joined.append(ep)
            chosen[ep.id] = kept or ep
        self.endpoints = list(chosen.values())
        return joined, list(current.values())

    def set_panic(self, panic: bool) -> None:
        self.panic = panic
        for e in self.endpoints:
            e.panic = panic
            e.refresh()

    def available(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.available]

    def has_healthy(self) -> bool:
        # A loop, not any() over a generator: this runs on every request, and closing a generator
        # that any() stopped early raises GeneratorExit inside it.
        for e in self.endpoints:
            if e.available:
                return True
        return False
