"""The attempt loop and the response relay: the only module that decides about retries.

A request's life is ``PENDING -> COMMITTED -> DONE | ABORTED``. It is *pending* until the client has
been sent its first byte; the commit point is the upstream's first response bytes (for a stream,
its first SSE event), so queueing and prefill, where replicas die, overload and answer 503, all
fall inside the retryable window. While pending, a failure (connect refused or reset, a 5xx or 429
status, no first byte in time) moves the request to the next candidate endpoint, a *different*
replica, up to ``limits.max_attempts`` in all. Once committed, nothing is retried: a stream that
breaks ends with an SSE ``data: {"error": ...}`` event and no ``[DONE]``, which the official OpenAI
clients raise as ``APIError``.

A client that goes away cancels the handler task; the relay then closes the upstream connection so
the engine stops generating, and the endpoint is not blamed.

Hedging
-------
A replica can stall without failing: a GPU throttled or stuck in a long prefill queue, a process
alive enough for health checks. Waiting ``timeouts.first_byte_s`` (60 s) before trying elsewhere is
far too long for chat. A pool with ``hedge_after_s`` therefore sends a request that has had no
first byte for that long to the next candidate as well, without giving up the first: both *legs*
race, and the first usable response head (not a 5xx or 429) wins. The other leg is closed at once,
so its engine stops work on it and its slot is released; a leg that fails drops out and the other
keeps running. The request is still pending while they race, so whatever the winner sends is the
only answer the client sees.

A hedge costs a second prefill, most often on a replica without the prompt's prefix, and it comes
exactly when replicas are slow, which is when load is high. So it takes a candidate only below its
``max_in_flight``, is paid from the retry budget (a brownout stops hedging as it stops retries),
goes at most once per attempt, and counts as an attempt. ``gateway_hedges_total{pool,outcome}``
says how often it was needed and whether it won. Each leg keeps its own first-byte deadline, so a
hedged request may wait up to ``hedge_after_s + first_byte_s``. Pools without ``hedge_after_s``
keep the single-leg path, with no task per request.

A first leg outrun by its hedge counts as a failure of its replica for outlier detection, as a
first-byte timeout would, only sooner. A replica that merely runs a little slow wins some races and
loses others, and each answer it gives resets its count; one that stalls loses every race, so it is
ejected after ``outlier.consecutive_failures`` of them instead of hiding behind the hedges for good.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator

from gateway.errors import EngineError, GatewayError, engine_error_body, error_body, upstream_failure
from gateway.metrics import Metrics
from gateway.outlier import OutlierDetector
from gateway.pool import Endpoint, Pool
from gateway.server import Connection
from gateway.settings import Limits, Timeouts
from gateway.sse import SseCheck
from gateway.upstream import Exchange, Upstream, UpstreamError

# Client headers that describe this hop, or that the gateway sets itself; never forwarded upstream.
_NOT_FORWARDED = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
    b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"authorization",
    b"x-request-id", b"expect", b"cookie",
})
_USAGE = re.compile(rb'"(prompt_tokens|completion_tokens|cached_tokens)"\s*:\s*(\d+)')
_NO_USAGE: dict[bytes, int] = {}
USAGE_KEY = b'"usage"'
# Bytes searched from the end of a stream's first piece for USAGE_KEY, and kept of a usage event split
# between reads: engines' usage events are a few hundred bytes, and the last of a stream but [DONE].
USAGE_TAIL_MAX = 1024


class Call:
    """Everything one request carries from decode to settle.

    Fields are class-level defaults, so a new call sets only what differs: a request touches a
    few of them, and assigning all thirty per request would cost more than the routing itself.
    """

    model = ""  # a metric label: a configured model, or "" (a client must not mint label values)
    stream = False
    body = b""
    forward_headers = b""
    pool: Pool | None = None
    candidates: list[Endpoint] = []
    workload = "interactive"
    policy = ""
    keys = None  # picker.RouteKeys: the policy learns where they went, attempt by attempt
    branch = ""  # the routing decision, a metric label
    matched_blocks = 0
    key_id = ""
    quota = None  # limits.Admission while the key's slot and tokens are held
    endpoint: Endpoint | None = None  # of the last attempt
    status = 0
    attempts = 0
    written_at = 0.0  # upstream request written (last attempt)
    upstream_first_at = 0.0  # first response byte from the engine (streams)
    first_byte_at = 0.0  # first byte sent to the client
    done_at = 0.0
    events = 0
    last_event_at = 0.0
    outcome = "pending"  # pending | done | aborted | client_gone

    def __init__(self, route: str, path: bytes, request_id: bytes, received_at: float):
        self.route = route
        self.path = path
        self.request_id = request_id
        self.received_at = received_at
        self.usage_tail = b""  # in the instance: a stream reads it for every piece

    def note_stream_usage(self, data: bytes, usage_at: int) -> None:
        """Keep ``data``, a piece of the stream, from its last usage object on (``usage_at``, where
        the caller found USAGE_KEY searching backwards, or -1): the last one a stream carries is its
        final count. SGLang puts ``"usage":null`` in every chunk, which is skipped. Until the event
        that holds the usage ends (a blank line), the pieces that follow are kept too: a read may end
        in the middle of it. Only a cut inside the key itself loses the count, and then the key's
        estimate stands, as for a stream cut before its usage chunk.

        The callers search backwards (``rfind``): on SSE events, full of quotes, a forward search for
        a quoted key costs twice as much. In a stream's first piece, which for a short answer from a
        fast engine is the whole stream, only the last KB is searched."""
        value_at = usage_at + len(USAGE_KEY)
        if usage_at >= 0 and data[value_at:value_at + 5].lstrip(b" :")[:1] in (b"{", b""):
            self.usage_tail = data[usage_at:]
        elif self.usage_tail and b"\n\n" not in self.usage_tail and len(self.usage_tail) < USAGE_TAIL_MAX:
            self.usage_tail += data

    def usage(self) -> dict[bytes, int]:
        """Token counts from the engine's usage object, keyed by field name (parsed once)."""
        if not self.usage_tail:
            return _NO_USAGE
        usage = self.__dict__.get("_usage")
        if usage is None:
            usage = self._usage = {k: int(v) for k, v in _USAGE.findall(self.usage_tail)}
        return usage


def forward_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """End-to-end client headers, rendered once per request for every attempt."""
    return b"".join([k + b": " + v + b"\r\n" for k, v in headers if k not in _NOT_FORWARDED])


class RetryBudget:
    """A token bucket of retries: each request adds ``ratio``, time adds ``min_per_s``, capped at ``cap``.

    Over any stretch of traffic, retries <= ratio x requests + min_per_s x seconds + cap, so when a
    whole pool browns out, upstream attempts stay near (1 + ratio) x client requests instead of
    multiplying by the attempt limit.
    """

    def __init__(self, ratio: float, min_per_s: float, cap: float):
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.cap = cap
        self.balance = cap
        self.refilled_at = time.monotonic()

    def deposit(self) -> None:
        self.balance = min(self.cap, self.balance + self.ratio)

    def withdraw(self, now: float) -> bool:
        self.balance = min(self.cap, self.balance + (now - self.refilled_at) * self.min_per_s)
        self.refilled_at = now
        if self.balance >= 1.0:
            self.balance -= 1.0
            return True
        return False


class Relay:
    def __init__(self, upstream: Upstream, timeouts: Timeouts, limits: Limits, metrics: Metrics,
                 budget: RetryBudget, outlier: OutlierDetector, endpoint_header: bool):
        self.upstream = upstream
        self.timeouts = timeouts
        self.max_attempts = limits.max_attempts
        self.metrics = metrics
        self.budget = budget
        self.outlier = outlier
        self.endpoint_header = endpoint_header
        self.on_release: Callable[[Endpoint], None] = lambda endpoint: None

    async def serve(self, call: Call, conn: Connection) -> None:
        """Try the candidates in order until one answers; relay its answer to the client."""
        failure: UpstreamError | tuple[int, bytes, bytes] | None = None
        self.budget.deposit()
        cap = call.pool.config.max_in_flight  # type: ignore[union-attr]
        # Shared with the attempts: a hedge takes the next candidate, which is then not retried.
        spares = iter(call.candidates[:self.max_attempts])
        for endpoint in spares:
            if failure is not None:
                if endpoint.in_flight >= cap:
                    continue  # a fallback at capacity: admission let the request in for the first choice
                if not self.budget.withdraw(time.monotonic()):
                    self.metrics.retry_budget_exhausted.inc()
                    break
                self.metrics.child(self.metrics.retries, _reason(failure)).inc()
            failure = await self._attempt(call, endpoint, conn, spares)
            if failure is None:
                return
        raise _final_error(failure)

    async def _attempt(self, call: Call, endpoint: Endpoint, conn: Connection, spares: Iterator[Endpoint]):
        """One try, started on ``endpoint`` and, if its pool hedges, perhaps raced against a second
        leg (module docstring, "Hedging"). Returns None when answered, else the retryable failure."""
        legs: dict[Exchange, Endpoint] = {}
        call.endpoint = endpoint
        try:
            ex = self._send(call, endpoint, legs) or await self._connect(call, endpoint, legs)
            hedge_after = call.pool.config.hedge_after_s  # type: ignore[union-attr]
            if hedge_after is None:
                await ex.wait_first(self.timeouts.first_byte_s)
                if _refused(ex.status):
                    return await self._refusal(ex, endpoint)
            else:
                answer = await self._race(call, legs, hedge_after, spares)
                if not isinstance(answer, Exchange):
                    return answer
                ex, endpoint = answer, legs[answer]
                call.endpoint = endpoint
            if call.stream and ex.status == 200:
                await self._relay_stream(call, ex, conn)
            else:
                await ex.wait_done(self.timeouts.idle_s)
                self._respond(call, conn, ex.status, ex)
            self.outlier.success(endpoint)
            return None
        except UpstreamError as e:
            self.outlier.failure(endpoint, time.monotonic())
            if conn.started:
                self._abort_stream(call, conn, e)
                return None
            return e
        except asyncio.CancelledError:
            call.outcome = "client_gone"
            raise
        finally:
            for ex, leg_endpoint in legs.items():
                ex.abort()  # unless complete: the engine stops generating
                self._release(leg_endpoint)

    async def _race(self, call: Call, legs: dict[Exchange, Endpoint], hedge_after: float,
                    spares: Iterator[Endpoint]):
        """Wait for the first usable head among the legs; add the hedge leg when ``hedge_after``
        passes with none. Rare enough (pools that hedge) to afford a task per leg."""
        pool = call.pool.name  # type: ignore[union-attr]
        first_leg = next(iter(legs))
        waits = {asyncio.ensure_future(first_leg.wait_first(self.timeouts.first_byte_s)): first_leg}
        failure: UpstreamError | tuple[int, bytes, bytes] | None = None
        due = hedged = False  # hedge_after has passed; a second leg was tried
        try:
            while waits:
                done, _ = await asyncio.wait(waits, timeout=None if due else hedge_after,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    due = True
                    hedge = await self._hedge(call, legs, spares)
                    hedged = hedge is not None
                    if isinstance(hedge, Exchange):
                        waits[asyncio.ensure_future(hedge.wait_first(self.timeouts.first_byte_s))] = hedge
                    elif hedged:
                        failure = hedge  # it could not be sent; the first leg runs on alone
                    continue
                for task in done:
                    ex = waits.pop(task)
                    endpoint = legs[ex]
                    error = task.exception()
                    if error is not None:
                        self.outlier.failure(endpoint, time.monotonic())
                        failure = error  # type: ignore[assignment]
                    elif not _refused(ex.status):
                        if hedged:
                            outcome = "first_won" if ex is first_leg else "hedge_won"
                            self.metrics.child(self.metrics.hedges, pool, outcome).inc()
                            if first_leg in legs and ex is not first_leg:
                                # Outrun by a leg sent later: the early sign of a replica that stalls
                                # without failing, which nothing else would eject (module docstring).
                                self.outlier.failure(legs[first_leg], time.monotonic())
                        for other in list(legs):
                            if other is not ex:
                                self._drop(legs, other)
                        return ex
                    else:
                        failure = await self._refusal(ex, endpoint)
                    self._drop(legs, ex)
            if hedged:
                self.metrics.child(self.metrics.hedges, pool, "failed").inc()
            return failure
        finally:
            for task in waits:
                if task.done():
                    task.exception()  # a leg that lost while another won: its failure is no news
                else:
                    task.cancel()

    async def _hedge(self, call: Call, legs: dict[Exchange, Endpoint], spares: Iterator[Endpoint]):
        """Send the second leg to the next candidate with room, if the retry budget pays for it: its
        exchange, the failure if it could not be sent, or None if it was not tried."""
        pool = call.pool
        spare = next((e for e in spares if e.in_flight < pool.config.max_in_flight), None)  # type: ignore[union-attr]
        if spare is None or not self.budget.withdraw(time.monotonic()):
            self.metrics.child(self.metrics.hedges, pool.name, "skipped").inc()  # type: ignore[union-attr]
            return None
        try:
            return self._send(call, spare, legs) or await self._connect(call, spare, legs)
        except UpstreamError as e:
            self.outlier.failure(spare, time.monotonic())
            return e

    def _send(self, call: Call, endpoint: Endpoint, legs: dict[Exchange, Endpoint]) -> Exchange | None:
        """Count the request against ``endpoint``, tell the policy it went there, and write it on an
        idle connection; None when there is none, and then :meth:`_connect` opens one. Apart, so that
        the usual request makes no coroutine here."""
        call.attempts += 1
        call.pool.policy.observe(endpoint.id, call.keys, time.monotonic())  # type: ignore[union-attr]
        endpoint.in_flight += 1
        try:
            ex = self.upstream.reuse(endpoint.host, endpoint.port, self._render(call, endpoint))
        except BaseException:
            self._release(endpoint)
            raise
        if ex is not None:
            legs[ex] = endpoint
            call.written_at = call.written_at or time.monotonic()
        return ex

    async def _connect(self, call: Call, endpoint: Endpoint, legs: dict[Exchange, Endpoint]) -> Exchange:
        """:meth:`_send` on a new connection."""
        try:
            ex = await self.upstream.open(endpoint.host, endpoint.port, self._render(call, endpoint))
        except BaseException:
            self._release(endpoint)
            raise
        legs[ex] = endpoint
        call.written_at = call.written_at or time.monotonic()
        return ex

    def _drop(self, legs: dict[Exchange, Endpoint], ex: Exchange) -> None:
        """A leg is over: close it if unfinished (the engine stops generating), and release its slot."""
        ex.abort()
        self._release(legs.pop(ex))

    def _release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self.on_release(endpoint)

    async def _refusal(self, ex: Exchange, endpoint: Endpoint):
        """The failure to retry with, its body read, for a head that calls for another endpoint
        (``_refused``). A 5xx counts against the endpoint; a 429 says only that it is busy."""
        status = ex.status
        try:
            await ex.wait_done(self.timeouts.idle_s)
        except UpstreamError as e:
            self.outlier.failure(endpoint, time.monotonic())
            return e
        if status >= 500:
            self.outlier.failure(endpoint, time.monotonic())
        return status, ex.header(b"content-type") or b"", ex.take()

    def _render(self, call: Call, endpoint: Endpoint) -> bytes:
        pool = call.pool
        return b"".join((
            b"POST ", call.path, b" HTTP/1.1\r\nhost: ", endpoint.id.encode(),
            b"\r\ncontent-length: %d\r\nx-request-id: " % len(call.body), call.request_id, b"\r\n",
            pool.auth_header if pool is not None else b"", call.forward_headers, b"\r\n", call.body,
        ))

    def _headers(self, call: Call) -> list[tuple[bytes, bytes]]:
        headers = [(b"x-request-id", call.request_id)]
        if self.endpoint_header and call.endpoint is not None:
            headers.append((b"x-gateway-endpoint", call.endpoint.id.encode()))
        return headers

    def _respond(self, call: Call, conn: Connection, status: int, ex: Exchange) -> None:
        body = ex.take()
        if status >= 400:
            body = engine_error_body(status, body)
        usage_at = body.rfind(b'"usage"')
        if usage_at >= 0:
            call.usage_tail = body[usage_at:]
        call.status = status
        call.first_byte_at = time.monotonic()
        conn.respond(status, self._headers(call), body, ex.header(b"content-type") or b"application/json")
        call.done_at = call.first_byte_at
        call.outcome = "done"

    async def _relay_stream(self, call: Call, ex: Exchange, conn: Connection) -> None:
        call.upstream_first_at = ex.last_read
        first = ex.take()
        check = SseCheck()
        if not check.feed(first):
            ex.abort()
            raise UpstreamError("protocol", "engine sent a malformed event stream", received=True)
        call.status = 200
        conn.start_stream(200, self._headers(call), first,
                          ex.header(b"content-type") or b"text/event-stream")
        call.first_byte_at = call.last_event_at = time.monotonic()
        call.events = first.count(b"data:")
        # A short stream may arrive whole in the first read.
        call.note_stream_usage(first, first.rfind(USAGE_KEY, -USAGE_TAIL_MAX))

        def sink(data: bytes) -> None:
            if not check.feed(data):
                ex.fail("protocol", "engine sent a malformed event stream")
                return
            conn.send_chunk(data)
            call.events += data.count(b"data:")
            call.last_event_at = ex.last_read
            usage_at = data.rfind(USAGE_KEY)
            if usage_at >= 0 or call.usage_tail:  # most pieces have none: no call for them
                call.note_stream_usage(data, usage_at)

        ex.pipe(sink)
        conn.on_pause, conn.on_resume = ex.pause, ex.resume
        try:
            await ex.wait_done(self.timeouts.idle_s)
        finally:
            conn.on_pause = conn.on_resume = None
            # The sink holds the exchange, which holds the sink: unhooked, both are freed at once.
            # Left to the cyclic GC, every stream's dozen objects piled up into 10-20 ms pauses.
            ex.pipe(None)
        conn.end_stream()
        call.done_at = time.monotonic()
        call.outcome = "done"

    def _abort_stream(self, call: Call, conn: Connection, e: UpstreamError) -> None:
        """After commit: end the stream with an error event, never [DONE]."""
        self.metrics.child(self.metrics.stream_aborts, e.reason).inc()
        conn.end_stream(b"data: " + error_body(
            f"upstream failed mid-stream: {e}", "server_error", "upstream_disconnected") + b"\n\n")
        call.done_at = time.monotonic()
        call.outcome = "aborted"


def _refused(status: int) -> bool:
    """An engine answer that another replica may do better on: a 5xx, or 429 (busy)."""
    return status >= 500 or status == 429


def _reason(failure) -> str:
    if isinstance(failure, UpstreamError):
        return failure.reason
    return f"status_{failure[0]}"


def _final_error(failure) -> GatewayError:
    if isinstance(failure, UpstreamError):
        return upstream_failure(failure.reason, str(failure))
    status, _, body = failure
    return EngineError(status, body)
