"""Replicas found in DNS: a pool with an ``srv`` name takes its replicas from that name's SRV records.

Why: engine pools scale (the gateway exports the demand an autoscaler reads), and a fixed list of
replicas in the config would mean rolling every gateway pod, and losing its routing state, for each
engine replica added or removed. In Kubernetes a StatefulSet's headless Service answers
``_<port name>._tcp.<service>.<namespace>.svc.cluster.local`` with one record per *ready* pod,
whose target is the pod's stable name (``sglang-llama8b-3.sglang-llama8b...``). SRV rather than A
records because the ring keys on replica ids: a pod's name survives its restarts, its IP does not,
and a new IP would move the restarted replica's share of cold prefixes and sessions.

Every ``discovery.interval_s`` each such pool's name is looked up (dnspython, with
``discovery.timeout_s``, the system's resolver configuration or ``discovery.nameservers``):

- **A target that joins** is health-checked first, so it joins healthy and is not counted as down
  meanwhile; after start-up it also slow-starts (``outlier.slow_start_s``), because its cache is
  cold. Replicas of the first lookup at start-up join as static endpoints do, without slow start.
- **A target that leaves** gets no new requests; those in flight finish on it. Its idle upstream
  connections are closed, its per-replica gauges dropped, and the routing policy forgets the
  prefixes and sessions it learnt there: a replica that comes back under the same name (a restarted
  pod) has a cold cache. The consistent-hash ring moves only the keys of the replica that joined
  or left (``ring.py``); sessions it held are placed afresh.
- **A lookup that fails** (timeout, SERVFAIL, NXDOMAIN, no records) keeps the last replicas: a DNS
  hiccup must not empty a pool, which would fail readiness and withdraw the region from DNS. Gone
  replicas are still taken out by their failing health checks. Each failure is counted
  (``gateway_discovery_failures_total``); the first of a run and the recovery are logged.

SRV priority and weight are ignored: every target is a replica of equal standing. Cost: one UDP
query per pool per interval, off the request path.
"""

from __future__ import annotations

import asyncio
import logging

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from gateway.health import HealthChecker
from gateway.metrics import Metrics
from gateway.pool import Endpoint, Pool
from gateway.settings import Discovery as DiscoveryConfig
from gateway.settings import nameserver
from gateway.upstream import Upstream

log = logging.getLogger("gateway.discovery")


class Discovery:
    def __init__(self, pools: list[Pool], config: DiscoveryConfig, health: HealthChecker, upstream: Upstream,
                 metrics: Metrics):
        self.pools = [p for p in pools if p.config.srv]
        self.config = config
        self.health = health
        self.upstream = upstream
        self.metrics = metrics
        self._failing: set[str] = set()
        self._task: asyncio.Task | None = None
        self._resolver: dns.asyncresolver.Resolver | None = None
        if self.pools:
            try:
                self._resolver = resolver(config.nameservers)
            except dns.resolver.NoResolverConfiguration as e:
                raise SystemExit(f"edge-gateway: replica discovery has no resolver ({e}); "
                                 "set `discovery.nameservers`") from None

    async def start(self) -> None:
        """The first lookup of every pool (start-up waits for it), then the refresh loop."""
        if not self.pools:
            return
        await self.refresh(slow_start=False)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.refresh(slow_start=True)
            except Exception:  # a bug here must not stop discovery for the life of the process
                log.exception("replica discovery round failed; retrying next interval")

    async def refresh(self, slow_start: bool) -> None:
        await asyncio.gather(*(self._refresh(pool, slow_start) for pool in self.pools))

    async def _refresh(self, pool: Pool, slow_start: bool) -> None:
        name = pool.config.srv
        assert name is not None and self._resolver is not None
        try:
            urls = await lookup(self._resolver, name, self.config.timeout_s)
        except LookupFailure as e:
            self.metrics.child(self.metrics.discovery_failures, pool.name, e.reason).inc()
            if pool.name not in self._failing:
                self._failing.add(pool.name)
                log.warning("replica lookup failed; keeping the last replicas", extra={"fields": {
                    "pool": pool.name, "srv": name, "reason": e.reason, "error": str(e),
                    "replicas": len(pool.endpoints)}})
            return
        if pool.name in self._failing:
            self._failing.discard(pool.name)
            log.info("replica lookup works again", extra={"fields": {"pool": pool.name, "srv": name}})
        self.metrics.child(self.metrics.discovered, pool.name).set(len(urls))
        known = {e.id for e in pool.endpoints}
        found = [Endpoint(url, pool.name) for url in urls]
        await self.health.welcome(pool, [e for e in found if e.id not in known], slow_start)
        joined, left = pool.replace_endpoints(found)
        for ep in left:
            for _ in pool.policy.forget(ep.id):
                await asyncio.sleep(0)  # requests run between the steps of a long walk
            self.health.forget(ep)
            self.upstream.drop(ep.host, ep.port)
            self.metrics.forget_endpoint(pool.name, ep.id)
        if joined or left:
            log.info("pool replicas changed", extra={"fields": {
                "pool": pool.name, "joined": [e.id for e in joined], "left": [e.id for e in left],
                "replicas": len(pool.endpoints)}})


class LookupFailure(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # a metric label: timeout | nxdomain | no_answer | servfail | error


def resolver(nameservers: list[str]) -> dns.asyncresolver.Resolver:
    """The system's resolver, or one that asks ``nameservers`` (validated entries of the setting)."""
    if not nameservers:
        return dns.asyncresolver.Resolver()
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = [dns.nameserver.Do53Nameserver(*nameserver(s)) for s in nameservers]  # type: ignore[misc]
    return r


async def lookup(r: dns.asyncresolver.Resolver, name: str, timeout_s: float) -> list[str]:
    """The replica URLs ``http://target:port`` of SRV name ``name``, sorted; raises LookupFailure."""
    try:
        answer = await r.resolve(name, "SRV", lifetime=timeout_s)
    except dns.resolver.NXDOMAIN as e:
        raise LookupFailure("nxdomain", str(e)) from None
    except dns.resolver.NoAnswer as e:
        raise LookupFailure("no_answer", str(e)) from None
    except dns.resolver.NoNameservers as e:
        raise LookupFailure("servfail", str(e)) from None
    except dns.exception.Timeout as e:
        raise LookupFailure("timeout", str(e)) from None
    except dns.exception.DNSException as e:
        raise LookupFailure("error", str(e)) from None
    # A target of "." means "no such service here" (RFC 2782); port 0 cannot be connected to.
    urls = sorted({f"http://{rr.target.to_text(omit_final_dot=True)}:{rr.port}"
                   for rr in answer if rr.port and rr.target != dns.name.root})
    if not urls:
        raise LookupFailure("no_answer", f"{name} has no usable SRV target")
    return urls
