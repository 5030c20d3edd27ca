"""Endpoints (engine replicas) and the pools that group them by engine kind, role and models.

An :class:`Endpoint` carries everything routing reads about a replica: its in-flight count in this
process, what the engine itself last reported (running and queued requests, KV usage), its health,
and its slow-start weight. Health and scrapes update these fields; the picker only reads them.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from gateway import settings as cfg


class Endpoint:
    __slots__ = ("id", "pool", "host", "port", "in_flight", "healthy", "ejected_until",
                 "weight", "engine_foreign", "engine_kv_usage", "engine_seen_at")

    def __init__(self, url: str, pool: str):
        parts = urlsplit(url)
        self.id = f"{parts.hostname}:{parts.port}"
        self.pool = pool
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.in_flight = 0
        self.healthy = False  # until the first health check passes
        self.ejected_until = 0.0
        self.weight = 1.0
        self.engine_foreign = 0.0  # running + queued at the engine that are not this process's
        self.engine_kv_usage = 0.0
        self.engine_seen_at = 0.0

    @property
    def available(self) -> bool:
        return self.healthy and self.ejected_until <= time.monotonic()

    @property
    def load(self) -> float:
        """Requests this process has in flight there, plus those the engine last reported from others."""
        return self.in_flight + self.engine_foreign

    def __repr__(self) -> str:
        return f"Endpoint({self.id}, pool={self.pool}, in_flight={self.in_flight}, healthy={self.healthy})"


class Pool:
    __slots__ = ("name", "engine", "role", "models", "endpoints", "policy", "config", "auth_header")

    def __init__(self, config: cfg.Pool, policy):
        self.config = config
        self.name = config.name
        self.engine = config.engine
        self.role = config.role
        self.models = frozenset(config.models)
        self.endpoints = [Endpoint(url, config.name) for url in config.endpoints]
        self.policy = policy
        self.auth_header = (b"authorization: Bearer " + config.api_key.encode() + b"\r\n"
                            if config.api_key else b"")

    def available(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.available]

    def has_healthy(self) -> bool:
        return any(e.available for e in self.endpoints)
