"""Open-loop replay: send each request at its trace time, stream the answer, sample replica load.

Arrivals are open loop, as in the trace: request ``i`` is sent at wall time
``start + arrival_s / speed`` whatever happened to earlier requests, so a slow router builds queues
instead of slowing the offered load down. ``arrival_s`` is simulated time and the simulator runs
``speed`` simulated seconds per wall second, so the engines see the trace's (rate-scaled) timing.
One exception keeps chats causal: a session's turn is sent no earlier than the answer to its
previous turn (a user cannot reply before reading), so in a compressed trace a session's turns
follow each other back to back.
Dispatch lateness (how far behind schedule the client sent) is recorded, since a starved client
would understate the load.

Per request, the client measures time to first token (first SSE ``data:`` event, wall seconds)
and total latency, and reads ``usage.prompt_tokens`` and ``usage.prompt_tokens_details
.cached_tokens`` from the final usage event (``stream_options.include_usage``). A request counts as
an error unless it answered 200 and ended with ``[DONE]``.

While the replay runs, a sampler reads every replica's ``/sim/stats`` every ``interval_s`` and keeps
``running + waiting`` per replica, from which the load spread (max over mean per interval) is
computed, and the KV tokens running requests hold privately (``kv_private_tokens``: room no prefix
can be cached in). Cost: one small GET per replica per interval, on the client's event loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from loadtests.replay_lib.workload import Rendered

REQUEST_TIMEOUT_S = 300.0


@dataclass(slots=True)
class Outcome:
    index: int
    status: int = 0  # HTTP status; 0 if no response arrived
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    lateness_s: float = 0.0
    sent_at: float = 0.0  # time.perf_counter() when the request was sent


@dataclass
class LoadSamples:
    times: list[float] = field(default_factory=list)
    loads: list[list[int]] = field(default_factory=list)  # per sample: running + waiting per replica
    private_kv: list[list[int]] = field(default_factory=list)  # per sample: kv_private_tokens per replica


@dataclass
class ReplayResult:
    outcomes: list[Outcome]
    samples: LoadSamples
    wall_s: float


async def replay(
    front_url: str, items: list[Rendered], speed: float, replica_urls: list[str], interval_s: float = 0.1
) -> ReplayResult:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2
        samples = LoadSamples()
        done = asyncio.Event()
        sampler = asyncio.create_task(_sample(session, replica_urls, interval_s, samples, done, start))
        tasks = []
        previous_turn: dict[int, asyncio.Task] = {}
        for i, item in enumerate(items):
            due = start + item.request.arrival_s / speed
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lateness = max(0.0, loop.time() - due)
            sid = item.request.session
            task = asyncio.create_task(_send(session, front_url, i, item, lateness, previous_turn.get(sid)))
            if sid is not None:
                previous_turn[sid] = task
            tasks.append(task)
        outcomes = await asyncio.gather(*tasks)
        wall = loop.time() - start
        done.set()
        await sampler
    return ReplayResult(list(outcomes), samples, wall)


def request_id(index: int) -> str:
    return f"replay-{index}"


async def _send(
    session: aiohttp.ClientSession,
    front_url: str,
    index: int,
    item: Rendered,
    lateness: float,
    after: asyncio.Task | None,
) -> Outcome:
    if after is not None:
        # A chat turn needs the previous answer: it waits for it, however early its trace time.
        await asyncio.shield(after)
    out = Outcome(index, lateness_s=lateness)
    out.sent_at = sent = time.perf_counter()
    # The request id lets replay_lib/loss.py find the replica that served it in /sim/requests.
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id(index), **item.headers}
    finished = False
    try:
        async with session.post(front_url + item.path, data=item.body, headers=headers) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return out
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - sent
                if line.startswith(b"data: [DONE]"):
                    finished = True
                elif b'"prompt_tokens_details"' in line:
                    usage = orjson.loads(line[6:])["usage"]
                    out.prompt_tokens = usage["prompt_tokens"]
                    out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        out.latency_s = time.perf_counter() - sent
        if not finished:
            out.error = "stream ended without [DONE]"
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        out.error = f"{type(e).__name__}: {e}"[:200]
    return out


async def _sample(
    session: aiohttp.ClientSession,
    urls: list[str],
    interval_s: float,
    samples: LoadSamples,
    done: asyncio.Event,
    start: float,
) -> None:
    loop = asyncio.get_running_loop()
    tick = start
    while not done.is_set():
        tick += interval_s
        try:
            await asyncio.wait_for(done.wait(), max(0.0, tick - loop.time()))
            return
        except TimeoutError:
            pass
        try:
            stats = await asyncio.gather(*(_stats(session, u) for u in urls))
        except (TimeoutError, aiohttp.ClientError, OSError):
            continue
        samples.times.append(loop.time() - start)
        samples.loads.append([s["running"] + s["waiting"] for s in stats])
        samples.private_kv.append([s["kv_private_tokens"] for s in stats])


async def _stats(session: aiohttp.ClientSession, url: str) -> dict:
    return await _json(session, url + "/sim/stats", 5.0)


async def engine_counters(urls: list[str]) -> list[dict]:
    """Each replica's ``/sim/stats`` (prefix hit and query tokens, completions, ...)."""
    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(_stats(session, u) for u in urls)))


async def engine_requests(urls: list[str], limit: int) -> list[list[dict]]:
    """Each replica's request log (``/sim/requests``), oldest first, up to ``limit`` records."""
    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(_json(session, f"{u}/sim/requests?limit={limit}", 30.0)
                                           for u in urls)))


async def _json(session: aiohttp.ClientSession, url: str, timeout_s: float):
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        return await resp.json(loads=orjson.loads)


async def engine_metric(urls: list[str], name: str) -> list[float]:
    """One gauge per replica from its Prometheus ``/metrics`` (e.g. ``sglang:cache_hit_rate``)."""
    async with aiohttp.ClientSession() as session:
        texts = await asyncio.gather(*(_text(session, u + "/metrics") for u in urls))
    values = []
    for text in texts:
        for line in text.splitlines():
            if line.startswith((name + "{", name + " ")):
                values.append(float(line.rsplit(" ", 1)[1]))
                break
    return values


async def _text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return await resp.text()
