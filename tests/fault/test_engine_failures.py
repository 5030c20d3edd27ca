"""Engine failures under load: reliability scenarios 1-6 of the brief, with real processes and signals.

Setup (the brief's, scaled to a shared 2-core machine): four simulated SGLang replicas at
``--speed 0.06`` with a 0.15 s slow first token, i.e. about 20 ms per token and a TTFT of about 0.2 s,
plus a one-replica vLLM batch pool; gateway timeouts of 2 s per try to the first byte and 2 s idle
between chunks; health checks every 0.2 s. Where one replica must crash or hang on its own, each
replica is its own simulator process (``os.kill`` with SIGKILL / SIGSTOP / SIGCONT); otherwise one
process hosts all four and faults are set per replica through ``POST /sim/faults``.

Load is an open-loop burst from an asyncio client in a background thread (:class:`Load`): a few
hundred chat requests at 30-100 per second, 80% of them streaming, each with its own prompt (so the
prefix ring spreads them) and its own ``x-request-id``. The gateway names the replica that
answered in ``x-gateway-endpoint`` (``routing.endpoint_header``), so every outcome is attributed
to an engine. :class:`tests.fault.faultproxy.ProxyThread` taps or replaces an engine's port where a
test must see which requests reached it and when.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Self, TypeVar
from urllib.parse import urlsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL, http_get, pool_toml
from tests.fault.faultproxy import ProxyThread

pytestmark = pytest.mark.slow

SPEED = 0.06  # simulated seconds per wall second: about 20 ms per token for the default SGLang profile
SLOW_FIRST_TOKEN = ["--slow-first-token", "0.15"]
IDLE_S = 2.0
T = TypeVar("T")


# -- the stack ------------------------------------------------------------------------------------

def start_engines(simulator, separate: bool, extra: tuple[str, ...] = ()):
    """Four SGLang replicas (four processes if ``separate``, else one) and a one-replica vLLM batch
    pool, started in parallel; returns (interactive simulators, batch simulator)."""
    specs = [("vllm", 1, [])] + ([("sglang", 1, [*SLOW_FIRST_TOKEN, *extra])] * 4 if separate
                                  else [("sglang", 4, [*SLOW_FIRST_TOKEN, *extra])])
    with ThreadPoolExecutor(len(specs)) as pool:
        sims = list(pool.map(lambda s: simulator(s[0], replicas=s[1], speed=SPEED, extra=s[2]), specs))
    return sims[1:], sims[0]


def config(interactive: list[str], batch: list[str], policy: str | None = None, **sections: dict) -> str:
    """The gateway's TOML: test-sized timeouts and health, the replica header, then ``sections``."""
    merged: dict[str, dict] = {
        "timeouts": {"connect_s": 0.5, "first_byte_s": 2.0, "idle_s": IDLE_S},
        "health": {"interval_s": 0.2, "timeout_s": 0.5, "unhealthy_threshold": 1},
        "routing": {"endpoint_header": True},
    }
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    text = "".join(f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
                   for name, values in merged.items())
    return (text + pool_toml("sglang", "sglang", "interactive", interactive, policy)
            + pool_toml("batch", "vllm", "batch", batch))


def endpoint_id(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def metric(gw, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(sample.value for family in text_string_to_metric_families(gw.metrics())
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def admin_endpoints(gw) -> dict[str, dict]:
    return {e["endpoint"]: e for e in json.loads(http_get(f"{gw.admin_url}/admin/endpoints")[1])
            if e["pool"] == "sglang"}


def log_events(gw, message: str) -> list[dict]:
    return [doc for line in gw.log().splitlines() if line.startswith("{")
            for doc in [json.loads(line)] if doc.get("msg") == message]


def attempts(sim) -> int:
    """Generation requests a simulator's replicas received: every upstream attempt."""
    return sum(sim.stats(i)["requests"] for i in range(len(sim.ports)))


def early_streams(sim) -> int:
    """Streams a one-replica simulator is in the first half of (first event sent, 20 or more to go):
    each has been committed by the gateway and will still be running a few hundred ms from now."""
    return sum(1 for r in sim.requests(0, limit=200)
               if r["stream"] and 1 <= r["chunks_sent"] <= 20 and not r["finished"] and not r["cancelled"])


def eventually(probe: Callable[[], T], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.02)
    return value


def pause_until(moment: float) -> None:
    """Let the load run until ``moment`` (a point of the scenario's timeline, not a synchronisation)."""
    time.sleep(max(0.0, moment - time.monotonic()))


# -- the load -------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What the client saw of one request; times are ``time.monotonic()``."""

    index: int
    stream: bool
    sent_at: float
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    endpoint: str = ""  # x-gateway-endpoint: the replica that answered
    ended_at: float | None = None
    done: bool = False  # a stream's [DONE], or a complete non-streaming answer
    error_event: bool = False  # a stream's final data: {"error": ...}
    body: bytes = b""
    error: str = ""  # transport failure seen by the client

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.error_event and not self.error


class Load:
    """Open-loop chat traffic at ``rate`` per second from a background thread, until :meth:`stop`
    or ``limit`` requests. Every fifth request is non-streaming."""

    def __init__(self, url: str, rate: float, max_tokens: int = 40, limit: int = 2000):
        self.url = f"{url}/v1/chat/completions"
        self.rate = rate
        self.max_tokens = max_tokens
        self.limit = limit
        self.outcomes: list[Outcome] = []
        self.started_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="load", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10), "load generator did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        """Send no more; wait for the requests in flight (bounded by the client timeout)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)  # type: ignore[union-attr]
            self._thread.join(30)
            assert not self._thread.is_alive(), "load generator did not finish"
        return self.outcomes

    def finish(self, timeout_s: float = 20.0) -> list[Outcome]:
        """Wait until all ``limit`` requests have been sent and answered."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"{self.limit} requests not answered within {timeout_s} s"
        return self.outcomes

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            self._ready.set()
            tasks = []
            self.started_at = time.monotonic()
            for i in range(self.limit):
                wait = self.started_at + i / self.rate - time.monotonic()
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), wait)
                    except TimeoutError:
                        pass
                if self._stop.is_set():
                    break
                tasks.append(asyncio.create_task(self._one(session, i)))
            await asyncio.gather(*tasks)

    async def _one(self, session: aiohttp.ClientSession, i: int) -> None:
        outcome = Outcome(i, stream=i % 5 != 4, sent_at=time.monotonic())
        self.outcomes.append(outcome)
        body = {"model": MODEL, "max_tokens": self.max_tokens, "stream": outcome.stream,
                "messages": [{"role": "user", "content": f"Request {i}: tell me a story about number {i}."}]}
        try:
            async with session.post(self.url, json=body, headers={"x-request-id": f"r{i}"}) as resp:
                outcome.status = resp.status
                outcome.headers = {k.lower(): v for k, v in resp.headers.items()}
                outcome.endpoint = resp.headers.get("x-gateway-endpoint", "")
                if outcome.stream and resp.status == 200:
                    async for line in resp.content:
                        payload = line[5:].strip() if line.startswith(b"data:") else b""
                        if payload == b"[DONE]":
                            outcome.done = True
                        elif payload.startswith(b'{"error"'):
                            outcome.error_event = True
                            outcome.body = payload
                else:
                    outcome.body = await resp.read()
                    outcome.done = resp.status == 200 and b'"choices"' in outcome.body
        except (aiohttp.ClientError, TimeoutError) as e:
            outcome.error = repr(e)
        outcome.ended_at = time.monotonic()


def access_log(gw, requests: int) -> list[dict]:
    """The gateway's access log once it holds ``requests`` lines (it is flushed every 0.25 s)."""
    return eventually(lambda: len(log := gw.access_log()) >= requests and log, 5, "the access log flushed")


def figures(**values: object) -> None:
    """Print a scenario's observed figures: shown with ``-rP``/``-s``, and in any failure report."""
    print("figures:", json.dumps(values, default=str))


def failures(outcomes: list[Outcome]) -> list[tuple]:
    """A readable list of what went wrong, for assertion messages."""
    return [(o.index, o.status, o.endpoint, o.error or o.body[:120]) for o in outcomes if not o.ok]


# -- scenario 1 -----------------------------------------------------------------------------------

def test_engine_crash_reroutes_unstarted_requests_and_ends_its_running_streams_with_an_error_event_within_1s(
        simulator, gateway):
    """Scenario 1: ``kill -9`` one of four engines under streaming load.

    Requests not committed on the dead engine (everything that had no first byte from it, including
    requests in its prefill and those routed to it before health noticed) all succeed: they are
    retried elsewhere. Streams committed on it end with ``data: {"error": ...}`` and no ``[DONE]``
    within 1 s of the kill. From 2 s after the kill a tripwire listens on the dead engine's port:
    it must receive health probes only, no generation request.

    The retry budget's cap is raised to 30: the crash's burst of retries is about the victim's
    requests in prefill (10/s x 0.2 s) plus those routed to it until health or ejection take it out
    (10/s x up to 0.7 s), under 10, and this scenario is about rerouting, not budget exhaustion
    (scenarios 4 and 5). The brief's "p99 TTFT of unaffected requests rises < 25%" is not checked:
    on this shared 2-core box TTFT varies by more than that between identical runs.
    """
    engines, batch = start_engines(simulator, separate=True)
    gw = gateway(config([e.url(0) for e in engines], batch.urls, retry_budget={"cap": 30}))
    victim = engines[0]
    dead = endpoint_id(victim.url(0))
    with Load(gw.url, rate=40) as load:
        eventually(lambda: early_streams(victim) >= 2, 10, "two streams running on the victim")
        killed_at = time.monotonic()
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(5)
        pause_until(killed_at + 2.0)
        with ProxyThread(None, port=victim.ports[0]) as tripwire:
            pause_until(killed_at + 4.0)
            outcomes = load.stop()
            reached_dead_port = tripwire.requests

    cut = [o for o in outcomes if o.endpoint == dead and o.stream and o.status == 200 and not o.done]
    rerouted = [r for r in access_log(gw, len(outcomes)) if r["attempts"] > 1]
    figures(requests=len(outcomes), cut_streams=len(cut),
            cut_ended_within_s=round(max(o.ended_at - killed_at for o in cut), 3) if cut else None,
            other_failures=len(failures([o for o in outcomes if o not in cut])), rerouted=len(rerouted),
            requests_at_dead_port=Counter(r.method for r in reached_dead_port))
    assert len(cut) >= 2, "the crash cut fewer streams than were running on the engine"
    for o in cut:
        assert o.error_event, (o.index, o.error)
        assert o.ended_at - killed_at <= 1.0, (o.index, o.ended_at - killed_at)
    assert failures([o for o in outcomes if o not in cut]) == []
    assert rerouted and all(r["status"] == 200 for r in rerouted)
    assert metric(gw, "gateway_upstream_retries_total") == len(rerouted)
    assert [r for r in reached_dead_port if r.method == "POST"] == []
    assert any(r.path == "/health" for r in reached_dead_port)  # the tripwire was reachable all along
    assert batch.stats(0)["requests"] == 0


# -- scenario 2 -----------------------------------------------------------------------------------

def test_engine_hang_errors_streams_within_idle_timeout_then_ejects_and_readmits_it_after_ejection_slowly(
        simulator, gateway):
    """Scenario 2: SIGSTOP one of four engines while it streams, SIGCONT it once ejected and stalled.

    Its streams end with the error event within ``idle_s`` + 1 s of the stop; requests it had not
    answered yet time out after ``first_byte_s`` and succeed elsewhere. Three consecutive failures
    (those idle and first-byte timeouts) eject it: ``gateway_endpoint_ejections_total`` counts it
    and ``/admin/endpoints`` shows it ejected. After SIGCONT its health check passes at
    once, yet it stays out of rotation until its ``base_ejection_s`` (3 s) is over, and then comes
    back at a slow-start weight below 1 that grows. A fault proxy in front of it (a tap with no
    toxics) records when the gateway sends it requests: none while ejected, some again after.
    """
    engines, batch = start_engines(simulator, separate=True)
    victim = engines[0]
    with ProxyThread(("127.0.0.1", victim.ports[0])) as tap:
        gw = gateway(config([tap.url] + [e.url(0) for e in engines[1:]], batch.urls,
                            outlier={"consecutive_failures": 3, "base_ejection_s": 3.0, "slow_start_s": 4.0,
                                     "min_weight": 0.1}))
        hung = endpoint_id(tap.url)
        with Load(gw.url, rate=30) as load:
            eventually(lambda: early_streams(victim) >= 2, 10, "two streams running on the victim")
            stopped_at = time.monotonic()
            os.kill(victim.proc.pid, signal.SIGSTOP)
            try:
                ejected = eventually(lambda: (e := admin_endpoints(gw)[hung])["ejected_for_s"] > 0 and e,
                                     IDLE_S + 3, "the hung engine's ejection")
                ejected_seen_at = time.monotonic()
                # Three first-byte timeouts of requests written just before the stop can eject it a
                # little before its streams' idle timers fire; resuming then would un-stall them.
                pause_until(stopped_at + IDLE_S + 0.5)
            finally:
                os.kill(victim.proc.pid, signal.SIGCONT)
            # Each poll of /admin/endpoints, stamped before the request and (monotonic and wall) after
            # the answer: an answer saying "ejected" proves it was ejected until the first stamp.
            polls: list[tuple[float, float, float, dict]] = []

            def back() -> bool:
                asked = time.monotonic()
                entry = admin_endpoints(gw)[hung]
                polls.append((asked, time.monotonic(), time.time(), entry))
                return entry["available"]

            eventually(back, 3.0 + 2, "the engine back in rotation")
            _, returned_at, returned_wall, returned = polls[-1]
            last_out = polls[-2][0] if len(polls) > 1 else ejected_seen_at
            eventually(lambda: any(r.method == "POST" and r.at > returned_at for r in tap.requests), 4,
                       "requests reaching the engine again")
            ramped = eventually(lambda: (e := admin_endpoints(gw)[hung])["weight"] > returned["weight"] and e,
                                4, "the slow-start weight growing")
            outcomes = load.stop()
        reached = tap.requests

    stalled = [o for o in outcomes if o.endpoint == hung and o.stream and o.status == 200 and not o.done]
    (ejection,) = [e for e in log_events(gw, "endpoint ejected") if e["endpoint"] == hung]
    while_ejected = [r.request_id for r in reached
                     if r.method == "POST" and ejected_seen_at <= r.at < last_out]
    figures(requests=len(outcomes), stalled_streams=len(stalled),
            stalled_ended_after_stop_s=[round(o.ended_at - stopped_at, 3) for o in stalled],
            ejected_after_stop_s=round(ejected_seen_at - stopped_at, 3), ejection_s=ejection["seconds"],
            back_after_ejection_s=round(returned_wall - ejection["ts"], 3),
            requests_while_ejected=while_ejected, weight_at_return=returned["weight"],
            weight_later=ramped["weight"])
    assert len(stalled) >= 2, "the hang stalled fewer streams than were running on the engine"
    for o in stalled:
        assert o.error_event, (o.index, o.error)
        assert o.ended_at - stopped_at <= IDLE_S + 1.0, (o.index, o.ended_at - stopped_at)
    assert failures([o for o in outcomes if o not in stalled]) == []

    assert ejected["available"] is False
    assert metric(gw, "gateway_endpoint_ejections_total", endpoint=hung) == 1
    assert ejection["seconds"] == 3.0
    # Health came back long before the ejection ended: the ejection alone kept it out.
    assert any(entry["healthy"] and not entry["available"] for *_, entry in polls)
    assert returned_wall >= ejection["ts"] + ejection["seconds"]
    assert while_ejected == [], [r for r in access_log(gw, len(outcomes)) if r["request_id"] in while_ejected]
    assert returned["weight"] < ramped["weight"] < 1.0
    assert batch.stats(0)["requests"] == 0


# -- scenario 3 -----------------------------------------------------------------------------------

def test_connection_refused_before_first_byte_is_retried_once_on_another_engine_and_every_request_succeeds(
        simulator, gateway):
    """Scenario 3: one engine's port is closed (its fault proxy refuses connects) while health,
    checked only every 60 s, still calls it healthy.

    Every request gets its 200 and complete answer. ``gateway_upstream_retries_total{reason="connect"}``
    counts every retry, and no request takes more than one: the access log shows at most 2
    attempts, and each request reached exactly one of the three live engines (each of which sits
    behind a recording proxy), so the retry never went back to the refusing one. Outlier detection
    then ejects the refusing engine after ``consecutive_failures`` (5), which ends the retries.
    """
    (sim,), batch = start_engines(simulator, separate=False)
    with ExitStack() as stack:
        proxies = [stack.enter_context(ProxyThread(("127.0.0.1", port))) for port in sim.ports]
        gw = gateway(config([p.url for p in proxies], batch.urls, health={"interval_s": 60.0}))
        refusing, live = proxies[0], proxies[1:]
        refusing.refuse()
        with Load(gw.url, rate=40, max_tokens=8, limit=160) as load:
            outcomes = load.finish()
        seen = Counter(r.request_id for p in live for r in p.requests if r.method == "POST")

    access = {r["request_id"]: r for r in access_log(gw, len(outcomes))}
    retried = [rid for rid, r in access.items() if r["attempts"] == 2]
    figures(requests=len(outcomes), failures=len(failures(outcomes)), retried=len(retried),
            connect_retries=metric(gw, "gateway_upstream_retries_total", reason="connect"),
            most_attempts=max(r["attempts"] for r in access.values()),
            live_engines_per_request=Counter(seen.values()))
    assert failures(outcomes) == []
    assert all(r["attempts"] <= 2 for r in access.values())
    assert all(r["endpoint"] != endpoint_id(refusing.url) for r in access.values())
    assert retried
    assert metric(gw, "gateway_upstream_retries_total", reason="connect") == len(retried)
    assert metric(gw, "gateway_upstream_retries_total") == len(retried)
    assert seen == Counter({f"r{o.index}": 1 for o in outcomes})
    assert batch.stats(0)["requests"] == 0


# -- scenario 4 -----------------------------------------------------------------------------------

def test_all_engines_answering_503_give_a_fast_503_with_retry_headers_and_no_retry_storm(simulator, gateway):
    """Scenario 4: every replica answers 503 before the stream starts.

    Each client gets, within 1 s, a 503 with OpenAI's error JSON, ``Retry-After`` and
    ``x-should-retry: true``. Upstream attempts stay within the retry budget: with ``ratio`` 0.1,
    ``min_per_s`` 1 and ``cap`` 5, retries <= 0.1 x N + 1/s x T + 5; for N = 300 requests over
    T ~ 3 s that is <= 38, so attempts <= 1.13 x N, inside the brief's 1.2 x N, which is asserted too.
    """
    (sim,), batch = start_engines(simulator, separate=False,
                                  extra=("--error-rate", "1.0", "--error-status", "503"))
    budget = {"ratio": 0.1, "min_per_s": 1.0, "cap": 5.0}
    gw = gateway(config(sim.urls, batch.urls, retry_budget=budget))
    with Load(gw.url, rate=100, limit=300) as load:
        outcomes = load.finish()
    n = len(outcomes)
    span = max(o.ended_at for o in outcomes) - min(o.sent_at for o in outcomes)
    tries = attempts(sim)
    figures(requests=n, span_s=round(span, 3), attempts=tries, attempts_per_request=round(tries / n, 3),
            statuses=Counter(o.status for o in outcomes),
            slowest_s=round(max(o.ended_at - o.sent_at for o in outcomes), 3),
            headers_of_first=outcomes[0].headers)
    for o in outcomes:
        assert o.status == 503, (o.index, o.status, o.error)
        assert o.ended_at - o.sent_at < 1.0
        error = json.loads(o.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
    assert tries <= n + budget["ratio"] * n + budget["min_per_s"] * span + budget["cap"]
    assert tries <= 1.2 * n
    assert batch.stats(0)["requests"] == 0
    for o in outcomes:
        assert o.headers.get("x-should-retry") == "true", (o.index, o.headers)
        assert o.headers.get("retry-after", "").isdigit(), (o.index, o.headers)


# -- scenario 5 -----------------------------------------------------------------------------------

def test_brownout_retries_stay_within_the_budget_and_success_recovers_once_failing_engines_are_ejected(
        simulator, gateway):
    """Scenario 5: two of four replicas answer 500 to half their requests, at 50 requests/s.

    * Upstream attempts / client requests <= 1 + ``ratio`` + (``min_per_s`` x T + ``cap``) / N: the
      budget's own bound (ratio 0.1, so also <= 1.2 as the brief asks).
    * Both failing replicas get ejected (``consecutive_failures`` 3: a run of 3 failures at p = 0.5
      comes after 14 attempts on average, about 1 s here; with the default 5 it takes 62 and the
      test would wait up to ~15 s in the tail), and from then on >= 99.5% of requests succeed.
    * ``gateway_retry_budget_exhausted_total`` is non-zero within the first 3 s: before ejection
      about 25% of requests need a retry (half go to a failing replica, half of those fail) while
      the budget earns 10% plus 0.5/s, so its cap of 2 is spent after ~0.3 s (2 / (50 x 0.15 - 0.5)).
    """
    (sim,), batch = start_engines(simulator, separate=False)
    for i in (0, 1):
        sim.faults(i, error_rate=0.5, error_status=500)
    budget = {"ratio": 0.1, "min_per_s": 0.5, "cap": 2.0}
    gw = gateway(config(sim.urls, batch.urls, retry_budget=budget,
                        outlier={"consecutive_failures": 3, "base_ejection_s": 30.0}))
    failing = {endpoint_id(sim.url(0)), endpoint_id(sim.url(1))}
    with Load(gw.url, rate=50, max_tokens=8) as load:
        exhausted = eventually(lambda: metric(gw, "gateway_retry_budget_exhausted_total"), 3,
                               "retry budget exhausted")
        eventually(lambda: {e for e, v in admin_endpoints(gw).items() if v["ejected_for_s"] > 0} == failing,
                   10, "both failing replicas ejected")
        ejected_at = time.monotonic()
        pause_until(ejected_at + 4.0)
        outcomes = load.stop()
    n = len(outcomes)
    span = max(o.ended_at for o in outcomes) - load.started_at

    tries = attempts(sim)
    after = [o for o in outcomes if o.sent_at >= ejected_at]
    figures(requests=n, span_s=round(span, 3), attempts_per_request=round(tries / n, 3),
            allowed=round(1 + budget["ratio"] + (budget["min_per_s"] * span + budget["cap"]) / n, 3),
            budget_exhausted_early=exhausted, ejected_after_s=round(ejected_at - load.started_at, 3),
            requests_after_ejection=len(after), successes_after_ejection=sum(o.ok for o in after),
            successes_before=sum(o.ok for o in outcomes if o.sent_at < ejected_at))
    assert exhausted > 0
    assert tries / n <= 1 + budget["ratio"] + (budget["min_per_s"] * span + budget["cap"]) / n
    assert tries / n <= 1.2
    assert len(after) >= 150
    assert sum(o.ok for o in after) / len(after) >= 0.995, failures(after)
    assert batch.stats(0)["requests"] == 0


# -- scenario 6 -----------------------------------------------------------------------------------

def test_ejections_are_capped_and_a_pool_in_panic_spreads_traffic_over_every_healthy_engine(
        simulator, gateway):
    """Scenario 6 (cap and panic): three of four replicas answer 500 to everything; health passes.

    With ``max_ejected_percent`` 50 at most two replicas are ejected at once, so the third failing
    one stays in (checked on every ``/admin/endpoints`` poll and on the ejection log). With
    ``panic_threshold_percent`` 75, two available replicas out of four (the third failing one and
    the survivor) are below the threshold: ``/admin/endpoints`` shows the pool in panic, and
    traffic spreads over all four healthy replicas, the ejected ones included, instead of landing
    on the survivor alone. Round robin makes the fair share exactly 25% of first attempts; each
    replica must get >= 15% of the attempts and the survivor <= 40%.
    """
    (sim,), batch = start_engines(simulator, separate=False)
    for i in (0, 1, 2):
        sim.faults(i, error_rate=1.0, error_status=500)
    gw = gateway(config(sim.urls, batch.urls, policy="round_robin",
                        outlier={"consecutive_failures": 3, "base_ejection_s": 30.0,
                                 "max_ejected_percent": 50.0, "panic_threshold_percent": 75.0}))
    survivor = endpoint_id(sim.url(3))
    most_ejected = 0

    def panic() -> bool:
        nonlocal most_ejected
        entries = admin_endpoints(gw)
        most_ejected = max(most_ejected, sum(e["ejected_for_s"] > 0 for e in entries.values()))
        return all(e["panic"] for e in entries.values())

    with Load(gw.url, rate=40, max_tokens=8) as load:
        eventually(panic, 10, "the pool in panic")
        before = [sim.stats(i)["requests"] for i in range(4)]
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert panic()
            time.sleep(0.05)
        spread = [sim.stats(i)["requests"] - b for i, b in enumerate(before)]
        load.stop()

    ejections = log_events(gw, "endpoint ejected")
    figures(most_ejected_at_once=most_ejected, ejections=[e["endpoint"] for e in ejections],
            survivor=survivor, attempts_per_replica_in_panic=spread)
    assert most_ejected == 2
    assert len(ejections) == 2 and survivor not in {e["endpoint"] for e in ejections}
    assert metric(gw, "gateway_endpoint_ejections_total") == 2
    total = sum(spread)
    assert all(count >= 0.15 * total for count in spread), spread
    assert spread[3] <= 0.40 * total, spread
    assert batch.stats(0)["requests"] == 0


def test_repeat_ejections_lengthen_from_base_and_cap_at_max_ejection_time(simulator, gateway):
    """Scenario 6 (ejection time): one replica answers 500 to everything, under steady traffic.

    Each time its ejection ends it fails again at once and is ejected again, for ``base_ejection_s``
    x n, capped at ``max_ejection_s`` (Envoy's rule, gateway/outlier.py): with 0.5 s and 1.2 s the
    first four ejections last 0.5, 1.0 (double), 1.2 and 1.2 s. ``max_ejected_percent`` 10 is 0.4
    of a replica out of four, yet one replica may always be ejected. Round robin and a 10 ms slow
    start send the returning replica its full share at once, so it re-fails within ~0.15 s, far
    less than the 0.5 s it would need to stay in rotation for its ejection count to decay.
    """
    (sim,), batch = start_engines(simulator, separate=False)
    sim.faults(0, error_rate=1.0, error_status=500)
    gw = gateway(config(sim.urls, batch.urls, policy="round_robin",
                        outlier={"consecutive_failures": 2, "base_ejection_s": 0.5, "max_ejection_s": 1.2,
                                 "max_ejected_percent": 10.0, "slow_start_s": 0.01}))
    failing = endpoint_id(sim.url(0))

    def ejection_seconds() -> list[float]:
        return [e["seconds"] for e in log_events(gw, "endpoint ejected") if e["endpoint"] == failing]

    with Load(gw.url, rate=50, max_tokens=8):
        seconds = eventually(lambda: len(found := ejection_seconds()) >= 4 and found, 10, "four ejections")
    figures(ejection_seconds=seconds)
    assert seconds[:4] == [0.5, 1.0, 1.2, 1.2]
    assert batch.stats(0)["requests"] == 0
