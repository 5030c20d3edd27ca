"""Routing under faults: slow start after recovery, sticky sessions across a crash, prefix locality
against bounded load, and the isolation of batch traffic from the interactive pool (scenarios 7, 10,
11 and 12 of the reliability brief).

Every test runs the real gateway in front of simulator processes on loopback and reads where each
request went from the gateway's ``x-gateway-endpoint`` debug header (``routing.endpoint_header``),
cross-checked against what the simulated engines themselves received (``/sim/requests``,
``/sim/stats``). Load is a closed loop of asyncio clients (each sends its next request as soon as its
previous answer is read), sized for a 2-core machine shared with other work; each test says how its
numbers scale the brief's.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import openai
import pytest

from gateway.affinity import key_hash, prefix_hashes
from gateway.ring import HashRing
from gateway.settings import Routing
from engine_nodes.local_stack import stop_process
from tests.conftest import ROOT, MODEL, GatewayProcess, Simulator, http_get, pool_toml
from tests.integration.test_errors import assert_openai_error, post

pytestmark = pytest.mark.slow

ROUTING = Routing()  # the gateway's defaults: block size, ring key depth, vnodes, load factor
HEALTH = "[health]\ninterval_s = 0.2\ntimeout_s = 0.5\nunhealthy_threshold = 1\n"
ENDPOINT_HEADER = "[routing]\nendpoint_header = true\n"


# -- helpers ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    sent_at: float  # monotonic time the request left the client
    status: int
    endpoint: str  # the replica that answered, from x-gateway-endpoint
    tag: object  # what the job carried: the prompt's ring owner, its system prompt, ...


async def drive(url: str, jobs: Iterator[tuple[dict, object]], clients: int,
                stop: asyncio.Event | None = None) -> list[Answer]:
    """Closed-loop load: ``clients`` clients share ``jobs`` (JSON body, tag) until it runs out or
    ``stop`` is set."""
    answers: list[Answer] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def client() -> None:
            for body, tag in jobs:
                if stop is not None and stop.is_set():
                    return
                sent_at = time.monotonic()
                async with session.post(url, json=body) as resp:
                    await resp.read()
                answers.append(Answer(sent_at, resp.status, resp.headers.get("x-gateway-endpoint", ""), tag))

        await asyncio.gather(*(client() for _ in range(clients)))
    return answers


async def sample_in_flight(admin_url: str, stop: asyncio.Event,
                           every_s: float = 0.1) -> list[dict[str, dict]]:
    """Snapshots of ``/admin/endpoints`` (endpoint id -> its row) until ``stop`` is set. Its own
    session: the load's connection pool is always full."""
    snapshots = []
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.get(f"{admin_url}/admin/endpoints") as resp:
                snapshots.append({row["endpoint"]: row for row in await resp.json()})
            await asyncio.sleep(every_s)
    return snapshots


def endpoints(gw) -> dict[str, dict]:
    return {row["endpoint"]: row for row in json.loads(http_get(f"{gw.admin_url}/admin/endpoints")[1])}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def endpoint_ids(*sims: Simulator) -> list[str]:
    return [f"127.0.0.1:{port}" for sim in sims for port in sim.ports]


def ring_key(prompt: str) -> int:
    """The key a cold completions prompt is placed by: the chain key of its first ring blocks."""
    keys = prefix_hashes(MODEL, prompt, ROUTING.block_chars, ROUTING.max_prefix_chars)
    return keys[min(ROUTING.ring_key_blocks, len(keys)) - 1]


def decisions(gw) -> dict[str, float]:
    """``gateway_routing_decisions_total`` by branch."""
    out: dict[str, float] = collections.Counter()
    for line in gw.metrics().splitlines():
        if line.startswith("gateway_routing_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('branch="', 1)[1].split('"', 1)[0]] += float(value)
    return out


def balance(snapshots: list[dict[str, dict]], busy: int) -> float:
    """max / mean over endpoints of the time-averaged in-flight count, from the snapshots taken while
    at least ``busy`` requests were in flight (ramp-up and tail excluded)."""
    steady = [s for s in snapshots if sum(row["in_flight"] for row in s.values()) >= busy]
    assert len(steady) >= 10, f"only {len(steady)} steady snapshots"
    means = [statistics.fmean(s[ep]["in_flight"] for s in steady) for ep in steady[0]]
    return max(means) / statistics.fmean(means)


# -- 7. slow start after recovery -------------------------------------------------------------------

SLOW_START_S = 8.0  # the brief's 30 s window, scaled: its 7.5 s checkpoint is this window's first quarter
CLIENTS = 48  # in flight at once: 12 per replica, enough for the load bounds not to be all rounding


@dataclass(frozen=True)
class Recovery:
    recovering: str
    ejected_at: float
    restored_at: float
    answers: list[Answer]  # tag: the ring owner of the request's prompt
    snapshots: list[tuple[float, dict[str, dict]]]

    def served(self, start: float, end: float) -> list[Answer]:
        """Answers to requests sent between ``start`` and ``end`` seconds after the restore."""
        return [a for a in self.answers if self.restored_at + start <= a.sent_at < self.restored_at + end]

    def share_of_fair(self, start: float, end: float) -> tuple[float, int]:
        answers = self.served(start, end)
        on_it = sum(a.endpoint == self.recovering for a in answers)
        return on_it / len(answers) * 4, len(answers)  # a fair share is 1/4 of 4 replicas

    def ownership_returned(self, start: float, end: float) -> float:
        """Of the prompts whose ring owner is the recovering replica, the share it served."""
        own = [a for a in self.served(start, end) if a.tag == self.recovering]
        return sum(a.endpoint == self.recovering for a in own) / len(own)


def balanced_prompts(ids: list[str]) -> Iterator[tuple[dict, object]]:
    """Endless distinct completions prompts, in rounds holding one prompt owned by each replica on
    the ring, so that a fair share is exactly 1/4 of requests and of ring ownership (random prompts
    would give each replica its ring share, which varies by several points with the port numbers)."""
    ring = HashRing(ids, ROUTING.vnodes)
    rng = random.Random(7)
    filler = " ".join(f"clause-{i}" for i in range(80))  # past the ring key's two 256-character blocks
    waiting: dict[str, collections.deque[str]] = {ep: collections.deque() for ep in ids}
    serial = 0
    while True:
        while not all(waiting.values()):
            prompt = f"request {serial:08d}: {filler}"
            serial += 1
            waiting[ring.owner(ring_key(prompt))].append(prompt)
        batch = [({"model": MODEL, "prompt": waiting[ep].popleft(), "max_tokens": 8}, ep) for ep in ids]
        rng.shuffle(batch)
        yield from batch


@pytest.fixture(scope="module")
def recovery(tmp_path_factory) -> Iterator[Recovery]:
    """Four replicas under steady load; one is ejected through the admin API, restored 1.5 s later,
    and ramps back over ``outlier.slow_start_s``; the load runs 3 s past the window."""
    sim = Simulator("sglang", 4, 0.05, [])  # 0.05: ~0.5 s per 8-token request, so 48 clients stay in flight
    gw = None
    try:
        # The ring owner alone places a cold prompt, within the holders' bound, so that "the prompts
        # it owns" are fixed by the ring and not shared with a second choice by load.
        config = (HEALTH + ENDPOINT_HEADER + "ring_choices = 1\nring_load_factor = 1.25\n"
                  + f"[outlier]\nslow_start_s = {SLOW_START_S}\n"
                  + pool_toml("s", "sglang", "interactive", sim.urls))
        gw = GatewayProcess(config, tmp_path_factory.mktemp("recovery"))
        yield asyncio.run(_recover_under_load(gw, endpoint_ids(sim)))
    finally:
        if gw is not None:
            gw.stop()
        sim.stop()


async def _recover_under_load(gw: GatewayProcess, ids: list[str]) -> Recovery:
    recovering = ids[1]
    stop = asyncio.Event()
    load = asyncio.create_task(drive(f"{gw.url}/v1/completions", balanced_prompts(ids), CLIENTS, stop))
    snapshots: list[tuple[float, dict[str, dict]]] = []
    async with aiohttp.ClientSession() as admin:
        async def act(path: str) -> float:
            async with admin.post(f"{gw.admin_url}/admin/endpoints/s/{recovering}/{path}") as resp:
                assert resp.status == 200, await resp.text()
            return time.monotonic()

        await asyncio.sleep(2.0)
        ejected_at = await act("eject?seconds=300")
        await asyncio.sleep(1.5)
        restored_at = await act("restore")
        while time.monotonic() < restored_at + SLOW_START_S + 3.0:
            async with admin.get(f"{gw.admin_url}/admin/endpoints") as resp:
                rows = await resp.json()
            snapshots.append((time.monotonic() - restored_at, {row["endpoint"]: row for row in rows}))
            await asyncio.sleep(0.25)
    stop.set()
    return Recovery(recovering, ejected_at, restored_at, await load, snapshots)


def test_recovering_engine_gets_at_most_35pct_of_a_fair_share_of_new_requests_in_the_first_quarter(recovery):
    """Scenario 7: the brief's "<= 35% of a fair share at t = 7.5 s of a 30 s window", checked over
    the whole first quarter of an 8 s window (about 140 requests)."""
    share, n = recovery.share_of_fair(0.0, SLOW_START_S / 4)
    assert n >= 100
    assert share <= 0.35, f"{share:.2f} of a fair share over {n} requests"


def test_recovering_engine_takes_back_its_prefixes_as_its_weight_grows_and_a_fair_share_after(recovery):
    """Scenario 7: an ejected replica gets nothing; restored, its weight ramps from
    ``outlier.min_weight`` to 1 over ``slow_start_s`` (8 s, the brief's 30 s scaled), the prompts it
    owns on the ring come back to it gradually rather than at once, and after the window its share
    of new requests is a fair one within +-10% (about 210 requests; prompts are balanced over the
    ring owners so a fair share is exactly 1/4)."""
    r = recovery
    ejected = [a for a in r.answers if r.ejected_at + 0.05 <= a.sent_at < r.restored_at]
    assert ejected and not any(a.endpoint == r.recovering for a in ejected)
    assert all(a.status == 200 for a in r.answers)

    weights = [(t, snap[r.recovering]["weight"]) for t, snap in r.snapshots]
    assert all(w <= 0.35 for t, w in weights if t < SLOW_START_S / 4), weights
    assert all(w == 1.0 for t, w in weights if t >= SLOW_START_S + 0.3), weights

    quarters = [r.ownership_returned(q * SLOW_START_S / 4, (q + 1) * SLOW_START_S / 4) for q in range(4)]
    after = r.ownership_returned(SLOW_START_S + 0.3, SLOW_START_S + 3.0)
    assert quarters[0] <= 0.6, quarters  # not handed back at once
    assert quarters[0] < quarters[3], quarters
    # Not 1.0: during the ramp the replicas that stood in for it became holders of some of its
    # prefixes too, and a request right after the window may still go to the least loaded holder.
    assert after >= 0.85, after

    share, n = r.share_of_fair(SLOW_START_S + 0.3, SLOW_START_S + 3.0)
    assert n >= 150
    assert 0.9 <= share <= 1.1, f"{share:.2f} of a fair share over {n} requests"


# -- 10. sticky sessions and failover ---------------------------------------------------------------

@pytest.fixture
def restart() -> Iterator:
    """Start a killed simulator's exact command again: the same port, as an engine restarted in place."""
    procs: list[subprocess.Popen] = []

    def start(dead: Simulator) -> None:
        proc = subprocess.Popen(dead.proc.args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().startswith("READY")  # type: ignore[union-attr]

    yield start
    for proc in procs:
        stop_process(proc)


def test_session_stays_on_one_engine_moves_to_its_ring_successor_on_a_crash_and_stays_after_rejoin(
        simulator, gateway, restart):
    """Scenario 10: 100 sequential requests with one ``X-Session-ID`` all land on the session's ring
    owner; after SIGKILL of that engine's process every request still succeeds and lands on the
    owner's ring successor, and it stays there after the engine is restarted on the same port and
    has finished its slow start (the move is remembered, so the session does not pay a second cold
    prefill). The simulated engines confirm it: each request reached exactly one of them."""
    sims = [simulator("sglang", replicas=1) for _ in range(4)]
    ids = endpoint_ids(*sims)
    gw = gateway(HEALTH + ENDPOINT_HEADER + "[outlier]\nslow_start_s = 1.0\n"
                 + pool_toml("s", "sglang", "interactive", [s.url(0) for s in sims]))
    session = "conversation-42"
    walk = list(HashRing(ids, ROUTING.vnodes).walk(key_hash(session)))
    owner, successor = walk[0], walk[1]

    def turn(i: int) -> str:
        body = json.dumps({"model": MODEL, "max_tokens": 3,
                           "messages": [{"role": "user", "content": f"turn {i}"}]}).encode()
        status, headers, reply = post(gw.port, body, extra=f"X-Session-ID: {session}\r\n".encode())
        assert status == 200, reply
        return headers["x-gateway-endpoint"]

    assert {turn(i) for i in range(100)} == {owner}
    assert [s.stats(0)["requests"] for s in sims] == [100 if ep == owner else 0 for ep in ids]

    dead = sims[ids.index(owner)]
    os.kill(dead.proc.pid, signal.SIGKILL)
    dead.proc.wait()
    assert {turn(i) for i in range(100, 150)} == {successor}

    restart(dead)
    wait_for(lambda: endpoints(gw)[owner]["healthy"] and endpoints(gw)[owner]["weight"] == 1.0, 10,
             "the restarted engine to be healthy at full weight")
    assert {turn(i) for i in range(150, 200)} == {successor}
    assert dead.stats(0)["requests"] == 0  # the restarted process
    assert [s.stats(0)["requests"] for s in sims if s is not dead] == [
        100 if ep == successor else 0 for ep in ids if ep != owner]


# -- 11. prefix locality versus bounded load -------------------------------------------------------

SYSTEM_PROMPTS = [f"You are assistant number {k}. " + " ".join(f"rule-{k}-{j}" for j in range(120))
                  for k in range(10)]
LOCALITY_CLIENTS = 32


def system_prompt_chat(k: int, i: int) -> tuple[dict, object]:
    return ({"model": MODEL, "max_tokens": 8, "messages": [
        {"role": "system", "content": SYSTEM_PROMPTS[k]}, {"role": "user", "content": f"question {i}"}]}, k)


def test_shared_system_prompts_land_on_their_prefix_holders_while_in_flight_stays_balanced(
        simulator, gateway):
    """Scenario 11: 2,000 requests from 32 concurrent clients, each with one of 10 shared system
    prompts: >= 90% of routing decisions are prefix hits and
    >= 90% of requests find the system prompt in the engine's own KV cache, while the time-averaged
    in-flight count of the busiest replica stays within 1.3 x the mean. Each decision is counted
    under its branch: a system prompt's first request is cold (``ring``), and a holder past its
    load bound sends the request on (``overflow``) instead of piling up."""
    sim = simulator("sglang", replicas=4, speed=0.05)
    gw = gateway(HEALTH + ENDPOINT_HEADER + pool_toml("s", "sglang", "interactive", sim.urls))
    rng = random.Random(11)
    jobs = iter([system_prompt_chat(rng.randrange(10), i) for i in range(2000)])

    answers, snapshots = asyncio.run(drive_sampling_in_flight(gw, jobs))
    assert [a.status for a in answers] == [200] * 2000

    branches = decisions(gw)
    assert set(branches) <= {"ring", "prefix_hit", "overflow"}, branches
    assert branches["ring"] == 10  # each system prompt is cold exactly once
    assert branches["prefix_hit"] >= 0.9 * 2000, branches

    system_tokens = len(f"<|system|>\n{SYSTEM_PROMPTS[0]}\n".encode()) // 4  # the simulator's 4 bytes a token
    records = [r for i in range(4) for r in sim.requests(i, limit=2000)]
    assert len(records) == 2000
    cache_hits = sum(r["cached_tokens"] >= 0.8 * system_tokens for r in records)
    assert cache_hits >= 0.9 * 2000, cache_hits

    ratio = balance(snapshots, busy=int(0.75 * LOCALITY_CLIENTS))
    assert ratio <= 1.3, ratio


async def drive_sampling_in_flight(gw, jobs) -> tuple[list[Answer], list[dict[str, dict]]]:
    """Drive ``jobs`` through the gateway while sampling every replica's in-flight count."""
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_in_flight(gw.admin_url, stop))
    answers = await drive(f"{gw.url}/v1/chat/completions", jobs, LOCALITY_CLIENTS)
    stop.set()
    return answers, await sampler


def test_holder_pushed_past_its_load_bound_by_a_slow_engine_overflows_to_other_engines(simulator, gateway):
    """Scenario 11: a hot system prompt held by one replica whose engine turns slow (1 s before each
    first token): its requests pile up there only to the load bound (``routing.load_factor`` 1.25 x
    the mean), then overflow to other replicas, which become holders too; most of the hot prompt's
    requests are served elsewhere, every request succeeds, and the time-averaged in-flight count of
    the busiest replica stays within 1.3 x the mean."""
    sim = simulator("sglang", replicas=4, speed=0.05)
    gw = gateway(HEALTH + ENDPOINT_HEADER + pool_toml("s", "sglang", "interactive", sim.urls))
    hot, _ = system_prompt_chat(0, -1)
    status, headers, _ = post(gw.port, json.dumps(hot).encode())
    assert status == 200
    holder = headers["x-gateway-endpoint"]
    sim.faults(endpoint_ids(sim).index(holder), slow_first_token=1.0)
    rng = random.Random(12)
    # Half the requests carry the hot prompt, the rest the other nine.
    jobs = iter([system_prompt_chat(0 if i % 2 else rng.randrange(1, 10), i) for i in range(400)])
    before = decisions(gw)

    answers, snapshots = asyncio.run(drive_sampling_in_flight(gw, jobs))
    assert [a.status for a in answers] == [200] * 400
    after = decisions(gw)
    assert after["overflow"] - before["overflow"] >= 1, after
    hot_answers = [a for a in answers if a.tag == 0]
    on_holder = sum(a.endpoint == holder for a in hot_answers) / len(hot_answers)
    assert on_holder <= 0.5, on_holder
    assert len({a.endpoint for a in hot_answers}) >= 2
    ratio = balance(snapshots, busy=int(0.75 * LOCALITY_CLIENTS))
    assert ratio <= 1.3, ratio


def test_questions_about_one_document_in_one_user_message_land_where_the_document_is_cached(simulator, gateway):
    """Scenario 11: retrieval-style prompts carry the document and the question in one user
    message. The document is a shared prefix of the message, so after the first question every
    question goes to the replica that prefilled it and the engine reuses its KV pages."""
    sim = simulator("sglang", replicas=4)
    gw = gateway(HEALTH + ENDPOINT_HEADER + pool_toml("s", "sglang", "interactive", sim.urls))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    document = "Document: " + " ".join(f"fact-{i:04d}" for i in range(500))  # about 1,300 tokens
    questions = ["Which fact comes first?", "How many facts are there?", "Is fact-0042 listed?",
                 "Summarise the document in one line, please.", "Which is last?", "Anything odd?"]
    chosen = [client.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=2, messages=[{"role": "user", "content": f"{document}\n\nQuestion: {q}"}],
    ).headers["x-gateway-endpoint"] for q in questions]
    assert len(set(chosen)) == 1, chosen
    (replica,) = [i for i, e in enumerate(endpoint_ids(sim)) if e == chosen[0]]
    cached = sorted(r["cached_tokens"] for r in sim.requests(replica))
    document_tokens = len(document.encode()) // 4  # the simulator's 4 bytes a token
    assert cached[0] == 0 and all(c >= 0.9 * document_tokens for c in cached[1:]), cached


# -- 12. batch fallback isolation -------------------------------------------------------------------

def chat_body(content: str, **extra) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": content}],
                       **extra}).encode()


BATCH_HEADER = b"X-Workload-Class: batch\r\n"


def batch_pool_stack(simulator, gateway, queue: str = ""):
    """An SGLang interactive pool of 2 replicas (at most 2 requests in flight each) and a vLLM batch
    pool in its own process, so that it can be killed."""
    chat = simulator("sglang", replicas=2, speed=0.05)  # slow tokens: long streams keep the pool busy
    bulk = simulator("vllm", replicas=1)
    gw = gateway(HEALTH + ENDPOINT_HEADER + "batch_borrow_below = 0.5\n" + queue
                 + pool_toml("chat", "sglang", "interactive", chat.urls,
                             extra="target_in_flight = 1\nmax_in_flight = 2\n")
                 + pool_toml("bulk", "vllm", "batch", bulk.urls))
    return chat, bulk, gw


def open_streams(gw, n: int) -> list:
    """``n`` long interactive streams, each committed (first event received) when this returns."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    streams = []
    for i in range(n):
        stream = client.chat.completions.create(model=MODEL, max_tokens=1000, stream=True,
                                                messages=[{"role": "user", "content": f"long story {i}"}])
        next(iter(stream))
        streams.append(stream)
    return streams


def batch_marked(record: dict) -> bool:
    return record["headers"].get("x-workload-class") == "batch" or '"service_tier": "flex"' in record["body"]


def test_batch_goes_to_the_batch_pool_and_interactive_never_does_even_when_its_pool_is_saturated(
        simulator, gateway):
    """Scenario 12: requests marked batch (``X-Workload-Class: batch``, or ``"service_tier": "flex"``)
    go to the vLLM batch pool even while the interactive pool is idle; interactive requests never go
    there (``routing.interactive_spill`` is off), even when every interactive replica is at
    ``max_in_flight``: they wait in the bounded queue and get 429 ``overloaded``, while batch
    requests keep being served by the batch pool."""
    chat, bulk, gw = batch_pool_stack(
        simulator, gateway, queue="[admission]\ninteractive_queue = 2\ninteractive_wait_s = 0.5\n")
    chat_ids, bulk_ids = set(endpoint_ids(chat)), set(endpoint_ids(bulk))

    for i in range(3):
        for body, extra in ((chat_body(f"batch {i}"), BATCH_HEADER),
                            (chat_body(f"flex {i}", service_tier="flex"), b"")):
            status, headers, reply = post(gw.port, body, extra=extra)
            assert status == 200, reply
            assert headers["x-gateway-endpoint"] in bulk_ids
        status, headers, _ = post(gw.port, chat_body(f"interactive {i}"))
        assert status == 200 and headers["x-gateway-endpoint"] in chat_ids

    streams = open_streams(gw, 4)  # 2 replicas x max_in_flight 2: the interactive pool is full
    try:
        for i in range(3):
            started = time.monotonic()
            status, headers, reply = post(gw.port, chat_body(f"turned away {i}"))
            assert status == 429, reply
            assert_openai_error(reply, code="overloaded")
            assert headers["retry-after"] and headers["x-should-retry"] == "true"
            assert time.monotonic() - started < 0.5 + 0.5
            status, headers, reply = post(gw.port, chat_body(f"batch, saturated {i}"), extra=BATCH_HEADER)
            assert status == 200, reply
            assert headers["x-gateway-endpoint"] in bulk_ids
    finally:
        for stream in streams:
            stream.close()

    bulk_records = bulk.requests(0)
    assert len(bulk_records) == 9 and all(batch_marked(r) for r in bulk_records)
    assert not any(batch_marked(r) for i in range(2) for r in chat.requests(i))


def test_batch_borrows_the_interactive_pool_only_when_its_pool_is_down_and_the_interactive_pool_idle(
        simulator, gateway):
    """Scenario 12: with the batch pool killed (SIGKILL) while the interactive pool is busy (mean
    load 1 per replica, over ``routing.batch_borrow_below`` = 0.5), batch requests get 503
    ``no_healthy_upstream`` with ``Retry-After`` and ``x-should-retry: true``, none reaches an
    interactive engine, and interactive requests are unaffected: all succeed, with a median TTFT
    within 1.5 x (+ 50 ms) of the same traffic's while the batch pool was up (the brief's +-10% on
    p99 is not measurable on this shared 2-core machine). Once the interactive pool is idle again,
    batch requests borrow it (decision branch ``spill``)."""
    chat, bulk, gw = batch_pool_stack(simulator, gateway)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)

    def interactive_ttft(i: int) -> float:
        started = time.monotonic()
        stream = client.chat.completions.create(model=MODEL, max_tokens=4, stream=True,
                                                messages=[{"role": "user", "content": f"quick {i}"}])
        next(iter(stream))
        ttft = time.monotonic() - started
        for _ in stream:
            pass
        return ttft

    def batch_request(i: int) -> tuple[int, dict, bytes]:
        return post(gw.port, chat_body(f"batch {i}"), extra=BATCH_HEADER)

    streams = open_streams(gw, 2)  # mean load 1.0 per interactive replica: busy
    try:
        before = []
        for i in range(8):
            before.append(interactive_ttft(i))
            status, headers, _ = batch_request(i)
            assert status == 200 and headers["x-gateway-endpoint"] in endpoint_ids(bulk)

        os.kill(bulk.proc.pid, signal.SIGKILL)
        bulk.proc.wait()
        wait_for(lambda: not endpoints(gw)[endpoint_ids(bulk)[0]]["healthy"], 5, "the batch pool to be down")
        during = []
        for i in range(8, 16):
            during.append(interactive_ttft(i))
            status, headers, reply = batch_request(i)
            assert status == 503, reply
            assert_openai_error(reply, code="no_healthy_upstream")
            assert headers["retry-after"] and headers["x-should-retry"] == "true"
        assert not any(batch_marked(r) for i in range(2) for r in chat.requests(i))
        assert statistics.median(during) <= 1.5 * statistics.median(before) + 0.05, (before, during)
    finally:
        for stream in streams:
            stream.close()

    wait_for(lambda: all(endpoints(gw)[ep]["load"] == 0 for ep in endpoint_ids(chat)), 5,
             "the interactive pool to be idle")
    for i in range(3):
        status, headers, reply = batch_request(100 + i)
        assert status == 200, reply
        assert headers["x-gateway-endpoint"] in endpoint_ids(chat)
    assert sum(batch_marked(r) for i in range(2) for r in chat.requests(i)) == 3
    assert decisions(gw)["spill"] == 3
