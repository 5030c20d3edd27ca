"""One simulated replica: the engine's HTTP surface over aiohttp, plus the ``/sim/*`` admin API.

Every replica of a process shares the event loop but nothing else: each has its own engine task,
KV cache, fault knobs, request log and listening socket. A generation request runs these steps:

    record -> decode the JSON body -> check the model -> roll the error fault -> render and tokenise
    -> (slow first token) -> submit to the engine -> stream or wait -> account

A request is one engine sequence per choice: ``n`` samples of each prompt (a completions request may
carry a batch of prompts), numbered as vLLM numbers them, prompt index x n + sample. The samples of a
prompt share its prompt tokens in the usage and write different text. A completions request with
``echo`` gets its prompt back before the text (alone with ``max_tokens`` 0, as scoring harnesses ask
for it); ``echo`` on chat is ignored, and no request gets logprobs.

Engine paths (both flavours): ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``, ``GET /health``, ``GET /metrics``. SGLang adds ``GET /health_generate``,
``GET /get_model_info``, ``GET /get_server_info`` and ``POST|GET /flush_cache``.

Admin paths (not part of the engines): ``GET|POST /sim/faults``, ``GET /sim/requests?limit=N``,
``GET /sim/stats``, ``POST /sim/reset``. ``POST /sim/faults`` may name ``"port"`` to reach another
replica of the same process, which is the way to lift ``refuse_connections`` (a refusing replica's
own port is closed).

The listening socket is created here rather than by an aiohttp site, so that the replica can count
TCP accepts (``accepted_connections``, how a test proves a proxy reuses connections) and close and
reopen its listener for ``refuse_connections``. Handler cancellation is on: when a client goes away,
aiohttp cancels the handler, and the handler takes the request out of the engine's batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field

import orjson
import xxhash
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engine_nodes.catalog import MODELS
from engine_nodes.profiles import Profile
from engine_nodes.sim import metrics, tokens
from engine_nodes.sim.engine import CapacityError, Engine, EngineLimits, Sequence
from engine_nodes.sim.faults import Faults
from engine_nodes.sim.prefix_cache import PageCache
from engine_nodes.sim.timing import TimingModel
from engine_nodes.sim.wire import DONE, Flavor, Reply, Usage, Wire

DEFAULT_MAX_TOKENS = 16
MAX_CHOICES = 128  # choices per request (prompts x n); OpenAI's own bound on n
REQUEST_LOG_SIZE = 4096
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
GARBAGE = b"\x00\xff}{ this is not server-sent events\n\n"


@dataclass(frozen=True)
class ReplicaConfig:
    flavor: Flavor
    model: str  # served model name
    profile: Profile
    host: str
    port: int
    seed: int = 0
    speed: float = 1.0
    cache_tokens: int | None = None  # overrides the KV pool size derived from the profile


@dataclass(slots=True)
class RequestRecord:
    """One received generation request, as ``GET /sim/requests`` reports it."""

    id: str
    path: str
    headers: dict[str, str]
    body: str
    stream: bool = False
    chunks_sent: int = 0
    finished: bool = False
    cancelled: bool = False
    status: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    sim_ttft_s: float | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id, "path": self.path, "headers": self.headers, "body": self.body,
            "stream": self.stream, "chunks_sent": self.chunks_sent, "finished": self.finished,
            "cancelled": self.cancelled, "status": self.status, "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens, "sim_ttft_s": self.sim_ttft_s,
        }


@dataclass
class ReplicaStats:
    requests: int = 0
    accepted_connections: int = 0
    active: int = 0
    cancelled: int = 0
    completed: int = 0
    injected_errors: int = 0
    rejected: int = 0  # 4xx answers to malformed or unservable requests

    def as_json(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Fault(Exception):
    """A stream-breaking fault struck; the handler must not finish the response normally."""


@dataclass
class _Choices:
    """A request's sequences, one per choice (prompt index x n + sample), and what its answers show."""

    seqs: list[Sequence]
    n: int  # samples per prompt
    echoes: list[str] | None  # each prompt's text, when the request asks for it back (``echo``)
    generated: bool  # False for ``echo`` with ``max_tokens`` 0: one token is generated and dropped

    def text(self, index: int, words: list[str]) -> str:
        """Choice ``index``'s text for the generated ``words`` (its first ones, when streaming)."""
        text = "".join(words) if self.generated else ""
        return text if self.echoes is None else self.echoes[index // self.n] + text

    def usage(self) -> Usage:
        """Prompt tokens count once per prompt (its samples share them), completion tokens per
        sample (a dropped token too, as vLLM counts it)."""
        per_prompt = self.seqs[::self.n]
        return Usage(sum(s.prompt_tokens for s in per_prompt), sum(s.produced for s in self.seqs),
                     sum(s.cached_tokens for s in per_prompt))


@dataclass
class _StreamState:
    record: RequestRecord
    seqs: list[Sequence]
    response: web.StreamResponse
    faults: Faults
    pending: list[bytes] = field(default_factory=list)


class Replica:
    def __init__(self, config: ReplicaConfig, siblings: dict[int, Replica]) -> None:
        self.config = config
        self.siblings = siblings  # every replica of this process by port, this one included
        self.wire = Wire(config.flavor)
        profile = config.profile
        self.timing = TimingModel(profile)
        capacity = config.cache_tokens if config.cache_tokens is not None else self.timing.kv_capacity_tokens()
        self.cache = PageCache(max(1, capacity // profile.page_size), profile.page_size)
        model = MODELS[profile.model]
        self.max_model_len = model.max_context
        self.engine = Engine(
            self.timing, self.cache,
            EngineLimits(profile.max_running_requests, profile.chunked_prefill_tokens, model.max_context),
            config.speed,
        )
        self.salt = tokens.model_salt(config.model)
        self.faults = Faults()
        self._faults_set_at = time.monotonic()
        self._error_rng = random.Random(config.seed * 1_000_003 + config.port)
        self.stats = ReplicaStats()
        self.log: deque[RequestRecord] = deque(maxlen=REQUEST_LOG_SIZE)
        self.metrics = metrics.ReplicaMetrics(config.flavor, config.model, self.engine)
        self._counter = 0
        self._created = int(time.time())
        self._engine_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, faults: Faults) -> None:
        self._runner = web.AppRunner(
            self._build_app(), handle_signals=False, access_log=None,
            handler_cancellation=True, shutdown_timeout=0.5,
        )
        await self._runner.setup()
        self._engine_task = asyncio.create_task(self.engine.run(), name=f"engine:{self.config.port}")
        await self.set_faults(faults)

    async def stop(self) -> None:
        self._close_listener()
        if self._engine_task is not None:
            self._engine_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._engine_task
        if self._runner is not None:
            await self._runner.cleanup()

    async def set_faults(self, faults: Faults) -> None:
        if faults.flap_health != self.faults.flap_health:
            self._faults_set_at = time.monotonic()
        self.faults = faults
        if faults.refuse_connections:
            self._close_listener()
        elif self._listener is None:
            await self._open_listener()

    async def _open_listener(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.config.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.host, self.config.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        server = self._runner.server if self._runner else None
        assert server is not None

        def accept() -> web.RequestHandler:
            self.stats.accepted_connections += 1
            return server()

        self._listener = await asyncio.get_running_loop().create_server(accept, sock=sock, backlog=1024)

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        # A closed listening socket leaves accepted keep-alive connections open; a refusing engine
        # must not answer on them either: idle ones close now, busy ones after their response.
        server = self._runner.server if self._runner else None
        for handler in server.connections if server is not None else ():
            if handler._request_in_progress:
                handler.close()
            else:
                handler.force_close()
        if self._runner is not None and self._runner.server is not None:
            for connection in self._runner.server.connections:
                connection.close()  # idle keep-alive connections close now, busy ones after their request

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        if self.config.flavor == "sglang":
            app.router.add_get("/health_generate", self.health)
            app.router.add_get("/get_model_info", self.model_info)
            app.router.add_get("/get_server_info", self.server_info)
            app.router.add_route("*", "/flush_cache", self.flush_cache)
        app.router.add_get("/sim/faults", self.get_faults)
        app.router.add_post("/sim/faults", self.post_faults)
        app.router.add_get("/sim/requests", self.get_requests)
        app.router.add_get("/sim/stats", self.get_stats)
        app.router.add_post("/sim/reset", self.post_reset)
        return app

    # -- generation --------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.read()
        record = self._record(request, body)
        self.stats.active += 1
        try:
            return await self._serve(request, record, body, chat)
        except asyncio.CancelledError:
            record.cancelled = True
            self.stats.cancelled += 1
            raise
        finally:
            self.stats.active -= 1

    async def _serve(self, request: web.Request, record: RequestRecord, body: bytes,
                     chat: bool) -> web.StreamResponse:
        headers = _echo_headers(request)
        try:
            params = orjson.loads(body)
            if not isinstance(params, dict):
                raise ValueError("the request body must be a JSON object")
            record.stream = params.get("stream") is True
            prompts = [tokens.render_chat(params.get("messages"))] if chat else tokens.render_prompts(
                params.get("prompt"))
            n = _choices_per_prompt(params, len(prompts))
            echo = not chat and params.get("echo") is True
            max_tokens = _max_tokens(params, chat, echo)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return self._reject(record, 400, str(exc), headers)
        requested_model = params.get("model")
        if requested_model is not None and requested_model != self.config.model:
            return self._reject(record, 404, f"The model `{requested_model}` does not exist.", headers, "model")
        faults = self.faults
        if faults.error_rate and self._error_rng.random() < faults.error_rate:
            self.stats.injected_errors += 1
            return self._error(record, faults.error_status, "Simulated engine failure.", headers)
        if faults.slow_first_token:
            await asyncio.sleep(faults.slow_first_token)

        self._counter += 1
        unique = xxhash.xxh3_128_hexdigest(f"{self.config.seed}:{self.config.port}:{self._counter}".encode())
        reply = Reply(
            id=self.wire.response_id(chat, unique, request.headers.get("x-request-id")),
            created=int(time.time()), model=self.config.model, chat=chat,
        )
        # vLLM runs an echo of the prompt alone (max_tokens 0) as a one-token generation.
        seqs = [self._sequence(f"{unique}-{p}-{sample}", prompt, max(max_tokens, 1), sample)
                for p, prompt in enumerate(prompts) for sample in range(n)]
        choices = _Choices(seqs, n, [p.decode(errors="replace") for p in prompts] if echo else None,
                           generated=max_tokens > 0)
        record.prompt_tokens = choices.usage().prompt_tokens
        try:
            for seq in seqs[::n]:
                self.engine.check(seq)
        except CapacityError as exc:
            return self._reject(record, 400, str(exc), headers)
        for seq in seqs:
            self.engine.submit(seq)
        try:
            if record.stream:
                include_usage = _include_usage(params)
                return await self._stream(request, record, choices, reply, include_usage, headers)
            return await self._complete(request, record, choices, reply, headers)
        finally:
            for seq in seqs:
                self.engine.abort(seq)  # a no-op for a finished one
            self._account(record, seqs)

    def _sequence(self, rid: str, prompt: bytes, max_tokens: int, sample: int) -> Sequence:
        # Each sample of one prompt writes its own text, as sampling with n > 1 does.
        digest = tokens.prompt_digest(self.config.seed + sample, self.config.model, prompt)
        return Sequence(
            rid=rid,
            prompt_tokens=tokens.token_count(prompt),
            keys=tokens.page_keys(prompt, self.cache.page_size, self.salt),
            max_tokens=max_tokens,
            words=tokens.output_words(digest, max_tokens),
            digest=digest,
        )

    async def _complete(self, request: web.Request, record: RequestRecord, choices: _Choices, reply: Reply,
                        headers: dict[str, str]) -> web.StreamResponse:
        for seq in choices.seqs:
            await seq.wait_beyond(seq.max_tokens - 1)
        faults = self.faults
        if faults.hang_after_chunks == 0:
            await _hang()
        if faults.reset_after_chunks == 0:
            _reset(request)
            return web.Response(status=200)
        usage = choices.usage()
        record.cached_tokens = usage.cached_tokens
        texts = [choices.text(i, seq.words) for i, seq in enumerate(choices.seqs)]
        payload = self.wire.response(reply, texts, "length", usage)
        if faults.garbage_after_chunks == 0:
            response = web.Response(body=GARBAGE, status=200, headers=headers, content_type="application/json")
            response.force_close()
            return response
        record.status = 200
        record.chunks_sent = 1
        record.finished = True
        return web.Response(body=orjson.dumps(payload), status=200, headers=headers,
                            content_type="application/json")

    async def _stream(self, request: web.Request, record: RequestRecord, choices: _Choices, reply: Reply,
                      include_usage: bool, headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={**headers, **SSE_HEADERS})
        await response.prepare(request)
        record.status = 200
        seqs = choices.seqs
        state = _StreamState(record, seqs, response, self.faults)
        templates = [self.wire.token_template(reply, index) for index in range(len(seqs))]
        sent = [0] * len(seqs)
        try:
            # The choices decode in the same engine steps, so waiting on each in turn costs no time;
            # every round writes what all of them produced in one flush.
            while any(sent[i] < seq.max_tokens and not seq.aborted for i, seq in enumerate(seqs)):
                for i, seq in enumerate(seqs):
                    if sent[i] == seq.max_tokens or seq.aborted:
                        continue
                    await seq.wait_beyond(sent[i])
                    texts = seq.words[sent[i]:seq.produced] if choices.generated else []
                    if sent[i] == 0:
                        if i % choices.n == 0:
                            record.cached_tokens += seq.cached_tokens
                        role = self.wire.role_chunk(reply, i)
                        if role is not None:
                            state.pending.append(role)
                        if choices.echoes is not None:  # the prompt comes back with the first token
                            texts = [choices.text(i, texts[:1]), *texts[1:]]
                    state.pending.extend(map(templates[i].render, texts))
                    sent[i] = seq.produced
                await self._flush(request, state)
            state.pending.extend(self.wire.finish_chunk(reply, i, "abort" if seq.aborted else "length")
                                 for i, seq in enumerate(seqs))
            if include_usage:
                state.pending.append(self.wire.usage_chunk(reply, choices.usage()))
            state.pending.append(DONE)
            await self._flush(request, state)
            await response.write_eof()
            record.finished = True
        except _Fault:
            pass
        except (ConnectionResetError, ConnectionError):
            record.cancelled = True
            self.stats.cancelled += 1
        return response

    async def _flush(self, request: web.Request, state: _StreamState) -> None:
        """Write pending SSE events, striking a fault when the chunk count reaches its threshold."""
        faults = state.faults
        record = state.record
        events = state.pending
        state.pending = []
        thresholds = [n for n in (faults.hang_after_chunks, faults.reset_after_chunks,
                                  faults.garbage_after_chunks) if n is not None]
        strike_at = min(thresholds) if thresholds else None
        if strike_at is not None and record.chunks_sent + len(events) >= strike_at:
            allowed = max(0, strike_at - record.chunks_sent)
            if allowed:
                await state.response.write(b"".join(events[:allowed]))
                record.chunks_sent += allowed
            await self._strike(request, state, strike_at)
            raise _Fault
        await state.response.write(b"".join(events))
        record.chunks_sent += len(events)

    async def _strike(self, request: web.Request, state: _StreamState, at: int) -> None:
        faults = state.faults
        if faults.hang_after_chunks == at:
            for seq in state.seqs:
                self.engine.abort(seq)
            await _hang()
        elif faults.reset_after_chunks == at:
            await asyncio.sleep(0.005)  # let the chunks already written leave before the RST
            _reset(request)
        else:
            await state.response.write(GARBAGE)
            await asyncio.sleep(0.005)
            if request.transport is not None:
                request.transport.close()

    # -- accounting and errors ---------------------------------------------------------------

    def _record(self, request: web.Request, body: bytes) -> RequestRecord:
        self.stats.requests += 1
        record = RequestRecord(
            id=request.headers.get("x-request-id", f"req-{self.stats.requests}"),
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body.decode("latin-1"),
        )
        self.log.append(record)
        return record

    def _account(self, record: RequestRecord, seqs: list[Sequence]) -> None:
        """Record a request's end exactly once: completed, or aborted (client gone, or a fault). The
        engine metrics count sequences: each of a request's choices runs in the batch as one."""
        record.sim_ttft_s = seqs[0].sim_ttft
        observed = self.metrics.requests
        if record.finished:
            self.stats.completed += 1
        for seq in seqs:
            if record.finished:
                observed.finished += 1
                observed.cached_tokens += seq.cached_tokens
                if seq.first_token_sim is not None and seq.finish_sim is not None:
                    observed.ttft.observe(seq.first_token_sim - seq.arrival_sim)
                    observed.e2e.observe(seq.finish_sim - seq.arrival_sim)
                    if seq.max_tokens > 1:
                        observed.itl.observe((seq.finish_sim - seq.first_token_sim) / (seq.max_tokens - 1))
            elif seq.aborted:
                observed.aborted += 1

    def _reject(self, record: RequestRecord, status: int, message: str, headers: dict[str, str],
                param: str | None = None) -> web.Response:
        self.stats.rejected += 1
        return self._error(record, status, message, headers, param)

    def _error(self, record: RequestRecord, status: int, message: str, headers: dict[str, str],
               param: str | None = None) -> web.Response:
        record.status = status
        record.finished = True
        return web.json_response(self.wire.error(status, message, param), status=status, headers=headers,
                                 dumps=_dumps)

    # -- other engine endpoints --------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        profile = self.config.profile
        body = self.wire.models(self.config.model, MODELS[profile.model].hf_path, self.max_model_len, self._created)
        return web.json_response(body, dumps=_dumps)

    def _healthy(self) -> bool:
        period = self.faults.flap_health
        if not period:
            return True
        return int((time.monotonic() - self._faults_set_at) / period) % 2 == 0

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._healthy() else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def model_info(self, request: web.Request) -> web.Response:
        hf_path = MODELS[self.config.profile.model].hf_path
        return web.json_response({
            "model_path": hf_path, "tokenizer_path": hf_path, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": "default",
            "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": "llama" if "llama" in self.config.profile.model else "qwen3_moe",
            "architectures": None,
        }, dumps=_dumps)

    async def server_info(self, request: web.Request) -> web.Response:
        p = self.config.profile
        spec = p.speculative
        engine = self.engine
        return web.json_response({
            "model_path": MODELS[p.model].hf_path,
            "served_model_name": self.config.model,
            "host": self.config.host,
            "port": self.config.port,
            "tp_size": p.tp,
            "quantization": None if p.quantization == "bf16" else p.quantization,
            "mem_fraction_static": p.mem_fraction,
            "page_size": p.page_size,
            "chunked_prefill_size": p.chunked_prefill_tokens,
            "max_running_requests": p.max_running_requests,
            "speculative_algorithm": spec.algorithm if spec else None,
            "speculative_draft_model_path": spec.draft_model if spec else None,
            "speculative_num_steps": spec.num_steps if spec else None,
            "speculative_eagle_topk": spec.eagle_topk if spec else None,
            "speculative_num_draft_tokens": spec.num_draft_tokens if spec else None,
            "enable_cache_report": True,
            "max_total_num_tokens": self.cache.capacity_tokens,
            "internal_states": [{
                "avg_spec_accept_length": engine.accept_length.ratio() if spec else None,
                "last_gen_throughput": engine.gen_throughput.ratio(),
            }],
            "version": "sim",
        }, dumps=_dumps)

    async def flush_cache(self, request: web.Request) -> web.Response:
        if self.engine.waiting or self.engine.running or not self.cache.flush():
            return web.Response(status=400, text="Cache not flushed. Please check backend logs for more details. "
                                "(When there are running or waiting requests, the operation will not be performed.)\n")
        return web.Response(text="Cache flushed.\nPlease check backend logs for more details. "
                            "(When there are running or waiting requests, the operation will not be performed.)\n")

    # -- admin -------------------------------------------------------------------------------

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.as_json(), dumps=_dumps)

    async def post_faults(self, request: web.Request) -> web.Response:
        try:
            patch = orjson.loads(await request.read() or b"{}")
            if not isinstance(patch, dict):
                raise ValueError("expected a JSON object")
            target = self.siblings.get(int(patch.pop("port", self.config.port)))
            if target is None:
                raise ValueError("no replica of this process listens on that port")
            faults = target.faults.updated(patch)
        except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400, dumps=_dumps)
        await target.set_faults(faults)
        return web.json_response(faults.as_json(), dumps=_dumps)

    async def get_requests(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return web.json_response({"error": "limit must be an integer"}, status=400, dumps=_dumps)
        records = list(self.log)[-limit:] if limit > 0 else []
        return web.json_response([r.as_json() for r in records], dumps=_dumps)

    async def get_stats(self, request: web.Request) -> web.Response:
        engine = self.engine
        body = self.stats.as_json() | {
            "running": len(engine.running),
            "waiting": len(engine.waiting),
            "kv_used_tokens": self.cache.used_pages * self.cache.page_size,
            "kv_capacity_tokens": self.cache.capacity_tokens,
            "cached_pages": self.cache.indexed_pages,
            "kv_private_tokens": self.cache.private_pages * self.cache.page_size,
            "evicted_pages": self.cache.stats.evicted_pages,
            "prefix_query_tokens": self.cache.stats.query_tokens,
            "prefix_hit_tokens": self.cache.stats.hit_tokens,
            "sim_time_s": engine.sim_now(),
        }
        return web.json_response(body, dumps=_dumps)

    async def post_reset(self, request: web.Request) -> web.Response:
        self.log.clear()
        active = self.stats.active
        self.stats = ReplicaStats(active=active)
        return web.json_response({"ok": True}, dumps=_dumps)


def _dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()


def _echo_headers(request: web.Request) -> dict[str, str]:
    request_id = request.headers.get("x-request-id")
    return {"x-request-id": request_id} if request_id is not None else {}


def _choices_per_prompt(params: dict[str, object], prompts: int) -> int:
    n = params.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError("n must be a positive integer")
    if n * prompts > MAX_CHOICES:
        raise ValueError(f"n x prompts must be at most {MAX_CHOICES}")
    return n


def _max_tokens(params: dict[str, object], chat: bool, echo: bool) -> int:
    """The tokens to generate; 0 only with ``echo``, which asks for the prompt alone back."""
    value = params.get("max_completion_tokens") if chat else None
    if value is None:
        value = params.get("max_tokens")
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if echo else 1):
        raise ValueError("max_tokens must be a positive integer (or 0, with echo)")
    return value


def _include_usage(params: dict[str, object]) -> bool:
    options = params.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def _hang() -> None:
    await asyncio.Event().wait()


def _reset(request: web.Request) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed peer would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
