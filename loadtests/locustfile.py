"""Locust users for the gateway's KPIs: interactive chat sessions, batch jobs and trace replay.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 --headless -u 20 -r 5 -t 2m \\
           --csv results/locust --html results/locust.html
    python -m loadtests.summary results

Three user classes (name them on the command line to run a subset):

- ``InteractiveChatUser`` (KPI class ``chat``): one multi-turn conversation at a time, sticky through
  ``X-Session-ID``; it opens with the system prompt of one of a few "applications" (shared by every
  session of that application), each turn appends a user message and the streamed reply, and the
  user thinks between turns. This is the traffic whose TTFT the gateway's prefix and session
  routing exist to protect.
- ``BatchUser`` (``batch``): ``X-Workload-Class: batch``, non-streaming, long outputs over long
  documents: the vLLM pool's traffic.
- ``TraceReplayUser`` (``trace``): replays the lengths, shared prefixes and sessions of a public trace
  (``LOADTEST_TRACE``, see ``loadtests/workload.py``). Arrival times are not replayed, Locust drives a
  closed loop under the load shape; ``loadtests/replay.py`` is the open-loop, timestamp-faithful replay.

**What is measured**, per request, on the client (all clocks are ``time.perf_counter``):

- *TTFT*: from just before the request is sent to the first SSE event carrying content (or a
  reasoning model's thinking);
- *ITL*: the gaps between later content deltas. Deltas that arrive together in one network read
  share the gap since the previous read equally, so a burst of k deltas (several tokens per engine
  step, or a client that read late) counts as k samples of gap/k rather than one gap and k-1 zeros:
  the samples then add up to the time the client spent waiting for tokens;
- *tokens/s*: completion tokens (from ``usage``) over the request's end-to-end time;
- *cache hit ratio*: ``usage.prompt_tokens_details.cached_tokens`` over ``usage.prompt_tokens``
  (streams ask for ``stream_options.include_usage``);
- HTTP 429 answers, counted apart; the user then waits ``Retry-After`` (at most 30 s), as the
  OpenAI SDKs do.

These go to Locust's statistics as custom request types next to the ``POST`` rows, each named by
the KPI class: ``TTFT`` (ms, one per streamed request), ``ITL`` (ms, the *mean* gap of one request,
so that its count stays one per request; the summary's ITL percentiles are over every gap), and
``TOKENS/S`` (the "response time" column holds tokens per second, not milliseconds). The ``POST``
rows' response time is the whole request, to the last byte. The raw samples are saved at the end
of the run as ``kpi_samples.json`` (``loadtests/kpi.py``) next to the ``--csv`` files, or in
``LOADTEST_RESULTS``.

Settings come from the environment (see :class:`Settings`). The gateway's URL is Locust's
``--host`` (or ``LOADTEST_HOST``).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gevent
import orjson
from gevent import GreenletExit
from locust import HttpUser, between, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # Locust imports this file by path, from any working directory
    sys.path.insert(0, str(REPO))

from loadtests import kpi, workload  # noqa: E402

log = logging.getLogger("loadtests")
MAX_RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class Settings:
    host: str | None  # LOADTEST_HOST; Locust's --host wins
    model: str  # LOADTEST_MODEL
    api_key: str | None  # LOADTEST_API_KEY, sent as "Authorization: Bearer ..."
    traces_dir: Path  # LOADTEST_TRACES
    trace: str  # LOADTEST_TRACE: hh_rlhf | mooncake | azure
    trace_max_input_tokens: int  # LOADTEST_TRACE_MAX_INPUT: longer trace prompts are cut
    applications: int  # LOADTEST_APPS: chat applications, one system prompt each
    think_s: tuple[float, float]  # LOADTEST_THINK_S="min,max": pause between turns of a conversation
    timeout_s: float  # LOADTEST_TIMEOUT_S: connect timeout, and longest silence inside a response
    results_dir: Path | None  # LOADTEST_RESULTS; default: the folder of --csv
    seed: int | None  # LOADTEST_SEED: repeat a run's prompts; default: new prompts, cold caches

    @classmethod
    def from_env(cls, env: os._Environ | dict[str, str] = os.environ) -> Settings:
        think = tuple(float(x) for x in env.get("LOADTEST_THINK_S", "1,5").split(","))
        if len(think) != 2 or not 0 <= think[0] <= think[1]:
            raise ValueError("LOADTEST_THINK_S must be 'min,max' seconds, min <= max")
        trace = env.get("LOADTEST_TRACE", "hh_rlhf")
        if trace not in workload.TRACE_FORMATS:
            raise ValueError(f"LOADTEST_TRACE must be one of {', '.join(workload.TRACE_FORMATS)}")
        results = env.get("LOADTEST_RESULTS")
        return cls(
            host=env.get("LOADTEST_HOST"),
            model=env.get("LOADTEST_MODEL", "llama-3.1-8b"),
            api_key=env.get("LOADTEST_API_KEY"),
            traces_dir=Path(env.get("LOADTEST_TRACES", REPO.parent / "shared" / "traces")),
            trace=trace,
            trace_max_input_tokens=int(env.get("LOADTEST_TRACE_MAX_INPUT", "32768")),
            applications=int(env.get("LOADTEST_APPS", "4")),
            think_s=(think[0], think[1]),
            timeout_s=float(env.get("LOADTEST_TIMEOUT_S", "120")),
            results_dir=Path(results) if results else None,
            seed=int(env["LOADTEST_SEED"]) if env.get("LOADTEST_SEED") else None,
        )


SETTINGS = Settings.from_env()
# Chosen before Locust forks its --processes workers, so they all send the same system prompts;
# workers on other machines need LOADTEST_SEED set to one value.
SEED = SETTINGS.seed if SETTINGS.seed is not None else random.SystemRandom().getrandbits(31)
TEXT = workload.TextSource(SEED)
APPLICATIONS = workload.applications(TEXT, SETTINGS.applications, random.Random(SEED))
RECORDER = kpi.Recorder()
_user_numbers = itertools.count()


@dataclass
class Outcome:
    """What one request produced, as the KPI record and the conversation need it."""

    text: str = ""
    error: str | None = None
    status: int = 0
    ttft_s: float | None = None
    gaps_s: list[float] | None = None
    end: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    completion_tokens: int = 0


class ApiUser(HttpUser):
    """Sends chat completions to the gateway and records what each one measured."""

    abstract = True
    host = SETTINGS.host
    kpi_class = ""

    def __init__(self, environment) -> None:
        super().__init__(environment)
        worker = environment.runner.worker_index  # 0 unless distributed: users differ across workers
        self.rng = random.Random(f"{SEED}:{worker}:{self.kpi_class}:{next(_user_numbers)}")
        self.headers = {"Content-Type": "application/json"}
        if SETTINGS.api_key:
            self.headers["Authorization"] = f"Bearer {SETTINGS.api_key}"

    def complete(self, messages: list[dict], max_tokens: int, stream: bool,
                 headers: dict[str, str] | None = None) -> str | None:
        """One chat completion; returns the reply text, or None if it failed."""
        body = {"model": SETTINGS.model, "messages": messages, "max_tokens": max_tokens, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        send = {"data": orjson.dumps(body), "headers": {**self.headers, **(headers or {})}, "stream": stream,
                "timeout": (SETTINGS.timeout_s, SETTINGS.timeout_s)}
        start = time.perf_counter()
        try:
            with self.client.post("/v1/chat/completions", name=self.kpi_class, catch_response=True,
                                  **send) as response:
                outcome = _read(response, start, stream)
                # Locust measured the time to the response headers; the request ends with its last byte.
                response.request_meta["response_time"] = (outcome.end - start) * 1000
                if outcome.error is None:
                    response.success()
                else:
                    response.failure(outcome.error)
        except GreenletExit:  # the test stopped while this request ran: Locust itself records nothing
            RECORDER.unfinished(self.kpi_class, time.perf_counter() - start)
            raise
        self._record(outcome, start)
        if outcome.status in (429, 503):
            gevent.sleep(_retry_after(response.headers))
        return outcome.text if outcome.error is None else None

    def _record(self, outcome: Outcome, start: float) -> None:
        samples = RECORDER.samples(self.kpi_class)
        samples.requests += 1
        if outcome.status == 429:
            samples.throttled += 1
        if outcome.error is not None:
            samples.failures += 1
            RECORDER.error(self.kpi_class, outcome.status, outcome.error)
            return
        e2e = outcome.end - start
        samples.e2e_s.append(e2e)
        samples.prompt_tokens += outcome.prompt_tokens
        samples.completion_tokens += outcome.completion_tokens
        if outcome.cached_tokens is not None:
            samples.cached_tokens += outcome.cached_tokens
            samples.cache_reported += 1
        fire = self.environment.events.request.fire
        if outcome.ttft_s is not None:
            samples.ttft_s.append(outcome.ttft_s)
            fire(request_type="TTFT", name=self.kpi_class, response_time=outcome.ttft_s * 1000,
                 response_length=0, exception=None, context={})
        if outcome.gaps_s:
            samples.itl_s.extend(outcome.gaps_s)
            mean_gap_ms = sum(outcome.gaps_s) / len(outcome.gaps_s) * 1000
            fire(request_type="ITL", name=self.kpi_class, response_time=mean_gap_ms,
                 response_length=len(outcome.gaps_s), exception=None, context={})
        if e2e > 0:
            rate = outcome.completion_tokens / e2e
            samples.tokens_per_s.append(rate)
            fire(request_type="TOKENS/S", name=self.kpi_class, response_time=rate,
                 response_length=outcome.completion_tokens, exception=None, context={})


def _read(response, start: float, stream: bool) -> Outcome:
    outcome = Outcome(status=response.status_code)
    if response.status_code != 200:
        outcome.end = time.perf_counter()
        outcome.error = _http_error(response)
        return outcome
    try:
        if stream:
            _read_stream(response, outcome, start)
        else:
            _read_body(response.content, outcome)
    except (OSError, ValueError) as exc:  # requests' connection and chunking errors, bad JSON
        outcome.error = outcome.error or f"{type(exc).__name__} while reading the response"
    outcome.end = time.perf_counter()
    return outcome


def _read_stream(response, outcome: Outcome, start: float) -> None:
    """Parse the SSE stream as it arrives; see the module docstring for what is timed."""
    pieces: list[str] = []
    gaps: list[float] = []
    carry = b""
    last = 0.0
    total_deltas = 0
    done = False
    # chunk_size=None yields each HTTP chunk as it arrives, so a read's time is its arrival time.
    for data in response.iter_content(chunk_size=None):
        now = time.perf_counter()
        lines = (carry + data).split(b"\n")
        carry = lines.pop()
        deltas = 0
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            event = orjson.loads(payload)
            if event.get("error"):
                error = event["error"]
                reason = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
                outcome.error = f"stream error: {reason or 'unknown'}"
                return
            if event.get("usage"):
                _read_usage(event["usage"], outcome)
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                piece = delta.get("content") or choice.get("text")
                if piece:
                    pieces.append(piece)
                # A reasoning model's thinking tokens are tokens the user waits for, but not the reply.
                if piece or delta.get("reasoning_content"):
                    deltas += 1
        if not deltas:
            continue
        total_deltas += deltas
        if outcome.ttft_s is None:
            outcome.ttft_s = now - start
        else:
            gaps.extend([(now - last) / deltas] * deltas)
        last = now
    outcome.text = "".join(pieces)
    outcome.gaps_s = gaps
    if not done:
        outcome.error = "stream ended without [DONE]"
    elif outcome.ttft_s is None:
        outcome.error = "stream had no content"
    elif not outcome.completion_tokens:  # no usage chunk: count the deltas
        outcome.completion_tokens = total_deltas


def _read_body(content: bytes, outcome: Outcome) -> None:
    doc = orjson.loads(content)
    choices = doc.get("choices") or []
    message = (choices[0].get("message") or {}) if choices else {}
    outcome.text = message.get("content") or ""
    if doc.get("usage"):
        _read_usage(doc["usage"], outcome)
    if not outcome.text:
        outcome.error = "response had no content"


def _read_usage(usage: dict, outcome: Outcome) -> None:
    outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details")
    # Engines report it only with --enable-cache-report (SGLang) / --enable-prompt-tokens-details (vLLM).
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        outcome.cached_tokens = int(details["cached_tokens"])


def _http_error(response) -> str:
    if response.status_code == 0:
        return f"no response: {type(response.error).__name__}"
    code = ""
    try:
        error = orjson.loads(response.content).get("error")
        code = (error.get("code") or error.get("type") or "") if isinstance(error, dict) else ""
    except (orjson.JSONDecodeError, AttributeError, OSError, ValueError):
        pass
    return f"HTTP {response.status_code}" + (f" {code}" if code else "")


def _retry_after(headers) -> float:
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float((headers or {}).get("Retry-After", "1"))))
    except ValueError:
        return 1.0


# -- the users ---------------------------------------------------------------------------------


class InteractiveChatUser(ApiUser):
    kpi_class = "chat"
    weight = 4
    wait_time = between(*SETTINGS.think_s)

    def on_start(self) -> None:
        self._new_session()

    def _new_session(self) -> None:
        app = self.rng.choice(APPLICATIONS)
        self.session = f"{app.name}-{self.rng.getrandbits(64):016x}"
        self.messages = [{"role": "system", "content": app.system_prompt}]
        self.turns_left = self.rng.randint(2, 8)

    @task
    def turn(self) -> None:
        if self.turns_left == 0:
            self._new_session()
        self.turns_left -= 1
        self.messages.append({"role": "user", "content": workload.user_turn(TEXT, self.rng)})
        reply = self.complete(self.messages, self.rng.randint(50, 300), stream=True,
                              headers={"X-Session-ID": self.session})
        if reply is None:  # the user gives up on this conversation
            self.turns_left = 0
            return
        self.messages.append({"role": "assistant", "content": reply})


class BatchUser(ApiUser):
    kpi_class = "batch"
    weight = 1
    wait_time = between(0.5, 2.0)

    @task
    def job(self) -> None:
        prompt = workload.batch_prompt(TEXT, self.rng)
        self.complete([{"role": "user", "content": prompt}], self.rng.randint(256, 1536), stream=False,
                      headers={"X-Workload-Class": "batch"})


class TraceReplayUser(ApiUser):
    kpi_class = "trace"
    weight = 2
    wait_time = between(*SETTINGS.think_s)
    _trace: workload.Trace | None = None  # loaded once per process, shared by every trace user

    def on_start(self) -> None:
        try:
            self.trace = _shared_trace()
        except workload.TraceMissing as exc:
            message = f"TraceReplayUser stopped: {exc}"
            if message not in RECORDER.record.notes:
                log.error(message)
            RECORDER.note(message)
            raise StopUser() from exc
        self.conversation = self.trace.next_conversation()
        self.turn_index = 0

    @task
    def replay(self) -> None:
        if self.turn_index == len(self.conversation.requests):
            self.conversation = self.trace.next_conversation()
            self.turn_index = 0
        request = self.conversation.requests[self.turn_index]
        self.turn_index += 1
        headers = {"X-Session-ID": self.conversation.session} if self.conversation.session else None
        prompt = self.trace.prompt(request, self.conversation.pass_no)
        if self.complete([{"role": "user", "content": prompt}], request.output_tokens, stream=True,
                         headers=headers) is None:
            self.turn_index = len(self.conversation.requests)  # skip the rest of a broken session


def _shared_trace() -> workload.Trace:
    if TraceReplayUser._trace is None:
        TraceReplayUser._trace = workload.load_trace(SETTINGS.traces_dir, SETTINGS.trace,
                                                     SETTINGS.trace_max_input_tokens, TEXT)
        log.info("trace %s: %d conversations from %s", SETTINGS.trace, len(TraceReplayUser._trace),
                 SETTINGS.traces_dir)
    return TraceReplayUser._trace


# -- run hooks: start, drill marks, worker reports, save ---------------------------------------


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs) -> None:
    RECORDER.start()
    RECORDER.note(f"prompts from LOADTEST_SEED={SEED} (set it to send the same prompts again)")


@events.request.add_listener
def _on_drill(request_type, name, exception=None, **_kwargs) -> None:
    # loadtests/shapes.py reports its failover actions as "DRILL" requests.
    if request_type == "DRILL":
        RECORDER.mark(name, ok=exception is None)


@events.report_to_master.add_listener
def _on_report_to_master(client_id, data) -> None:
    data["kpi"] = RECORDER.drain()


@events.worker_report.add_listener
def _on_worker_report(client_id, data) -> None:
    if "kpi" in data:
        RECORDER.absorb(data["kpi"])


@events.test_stop.add_listener
def _on_test_stop(environment, **_kwargs) -> None:
    RECORDER.stop()
    _save(environment)


@events.quitting.add_listener
def _on_quitting(environment, **_kwargs) -> None:
    # Workers' last reports reach a master after test_stop: save again with them.
    if isinstance(environment.runner, MasterRunner):
        _save(environment)


def _save(environment) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    directory = SETTINGS.results_dir
    csv_prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if directory is None and csv_prefix:
        directory = Path(csv_prefix).resolve().parent
    if directory is None:
        log.warning("KPI samples not saved: pass --csv or set LOADTEST_RESULTS")
        return
    log.info("KPI samples saved to %s", RECORDER.save(directory))
