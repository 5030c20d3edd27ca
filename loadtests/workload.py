"""What the load test sends: synthetic chat applications, batch documents, and replayed traces.

No prompt text ships with the load test, and the public traces carry none (only lengths and prefix
block hashes), so every prompt is synthesised. The one property that matters to the gateway and the
engines is *which prompts share a prefix*, so the synthesis keeps exactly that:

- **Text of a seed.** :meth:`TextSource.text` returns ``n`` bytes of English-looking words cut from
  one fixed pool at an offset derived from the seed, preceded by the seed itself (``"#<seed> "``).
  Equal seeds give equal text; different seeds give text that differs from its first bytes, so two
  prompts share a prefix only where the workload says they should. Cost: one slice of the pool.
- **Length.** Lengths are given in tokens and rendered as ``4 x tokens`` bytes. Four bytes is the
  simulator's tokenisation rule and close to what Llama-3's tokenizer makes of this word mix
  (5-6 bytes per token), so against real engines prompts come out 20-30 % shorter than asked.
- **Traces.** A trace request's prompt is the concatenation of its prefix blocks, block ``i`` being
  the text of seed ``(pass, hash_ids[i])`` (the last block cut to the request's input length). Two
  requests with the same first ``k`` hash ids therefore share the first ``k`` blocks byte for byte,
  which is what the hash ids mean. ``pass`` counts how often the trace has wrapped around, so a
  second pass does not hit the cache the first pass filled.

Traces (``../shared/traces``, see its README) come in three formats: ``hh_rlhf`` (multi-turn
sessions, 16-token blocks), ``mooncake`` (single requests, 512-token blocks, long prompts) and
``azure`` (lengths only: every prompt is unique). A conversation is the list of requests replayed in
order by one simulated user: a whole hh-rlhf session, or a single request for the other two.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

BYTES_PER_TOKEN = 4
_POOL_WORDS = 65536

_WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book eye "
    "job word business issue side kind head house service friend father power hour game line end "
    "member law car city community name president team minute idea kid body information back parent "
    "face others level office door health person art war history party result change morning reason "
    "research girl guy moment air teacher force education be have do say get make go know take see "
    "come think look want give use find tell ask seem feel try leave call good new first last long "
    "great little own other old right big high different small large next early young important few "
    "public bad same able the of and to in for on with as at by from about into over after"
).split()


class TextSource:
    """Deterministic filler text: equal seeds give equal bytes, in every process with the same salt.

    The salt is the run's seed: a new run sends text no engine has cached yet, and a run repeated
    with the same seed sends the same bytes.
    """

    def __init__(self, salt: int = 0) -> None:
        rng = random.Random(salt)
        self.salt = salt
        self._pool = " ".join(rng.choice(_WORDS) for _ in range(_POOL_WORDS)) + " "

    def text(self, seed: object, n_bytes: int) -> str:
        """``n_bytes`` ASCII bytes that start with the seed and depend only on it (and the salt)."""
        head = f"#{self.salt:x}.{seed} "
        if n_bytes <= len(head):
            return head[:n_bytes]
        need = n_bytes - len(head)
        pool = self._pool
        start = random.Random(head).randrange(len(pool))
        body = pool[start:start + need]
        while len(body) < need:  # longer than the rest of the pool: wrap around
            body += pool[:need - len(body)]
        return head + body


# -- interactive chat --------------------------------------------------------------------------


@dataclass(frozen=True)
class Application:
    """A product built on the model: its system prompt opens every conversation it serves."""

    name: str
    system_prompt: str


def applications(source: TextSource, count: int, rng: random.Random) -> list[Application]:
    """``count`` applications with system prompts of 500-1500 tokens."""
    apps = []
    for i in range(count):
        tokens = rng.randint(500, 1500)
        intro = f"You are the assistant of application {i}. Answer briefly and cite the manual below.\n"
        apps.append(Application(f"app-{i}", intro + source.text(f"app-{i}", tokens * BYTES_PER_TOKEN)))
    return apps


def user_turn(source: TextSource, rng: random.Random) -> str:
    """One user message of 20-150 tokens, unique to this turn."""
    return source.text(f"turn-{rng.getrandbits(48):x}", rng.randint(20, 150) * BYTES_PER_TOKEN)


# -- batch -------------------------------------------------------------------------------------

BATCH_JOBS = (
    "Summarise the following document in detail, section by section, for an internal report.",
    "Extract every entity, date and amount from the following record and explain each one.",
)


def batch_prompt(source: TextSource, rng: random.Random) -> str:
    """A job's shared instruction followed by a unique document of 500-4000 tokens."""
    job = rng.randrange(len(BATCH_JOBS))
    document = source.text(f"doc-{rng.getrandbits(48):x}", rng.randint(500, 4000) * BYTES_PER_TOKEN)
    return f"{BATCH_JOBS[job]}\n\n{document}"


# -- traces ------------------------------------------------------------------------------------


class TraceMissing(FileNotFoundError):
    """The trace file is not there; the message says where it was looked for and what to do."""


@dataclass(frozen=True)
class TraceRequest:
    input_tokens: int
    output_tokens: int
    block_ids: tuple[int, ...]  # prefix block hashes, empty when the trace has none
    index: int  # position in the file, the seed of a prompt without blocks


@dataclass(frozen=True)
class Conversation:
    session: str | None  # sent as X-Session-ID when the trace has sessions
    requests: tuple[TraceRequest, ...]
    pass_no: int


@dataclass(frozen=True)
class TraceFormat:
    path: str  # relative to the traces folder
    block_tokens: int  # tokens per prefix block (0: no blocks)


TRACE_FORMATS = {
    "hh_rlhf": TraceFormat("hh_rlhf/hh_harmless_test_sessions.jsonl", 16),
    "mooncake": TraceFormat("mooncake/synthetic_trace.jsonl", 512),
    "azure": TraceFormat("azure_llm_2023/AzureLLMInferenceTrace_conv.csv", 0),
}


class Trace:
    """A trace's conversations, handed out in file order to every user of the process.

    The cursor is shared so that N users walk the trace together, as the trace's own clients did;
    at the end it wraps around and the pass number goes up. Locust users are greenlets of one
    thread and nothing here yields, so the cursor needs no lock.
    """

    def __init__(self, name: str, conversations: list[tuple[str | None, tuple[TraceRequest, ...]]],
                 block_tokens: int, source: TextSource) -> None:
        if not conversations:
            raise ValueError(f"trace {name} has no requests")
        self.name = name
        self.block_tokens = block_tokens
        self._conversations = conversations
        self._source = source
        self._next = 0

    def __len__(self) -> int:
        return len(self._conversations)

    def next_conversation(self) -> Conversation:
        pass_no, i = divmod(self._next, len(self._conversations))
        self._next += 1
        session, requests = self._conversations[i]
        if session is not None and pass_no:
            session = f"{session}-p{pass_no}"
        return Conversation(session, requests, pass_no)

    def prompt(self, request: TraceRequest, pass_no: int) -> str:
        total = request.input_tokens * BYTES_PER_TOKEN
        if not request.block_ids:
            return self._source.text(f"{self.name}-{pass_no}-{request.index}", total)
        block_bytes = self.block_tokens * BYTES_PER_TOKEN
        parts = []
        for block in request.block_ids:
            n = min(block_bytes, total)
            if n <= 0:
                break
            parts.append(self._source.text(f"{self.name}-{pass_no}-b{block}", n))
            total -= n
        return "".join(parts)


def load_trace(traces_dir: Path, name: str, max_input_tokens: int, source: TextSource) -> Trace:
    """Read one trace; requests longer than ``max_input_tokens`` are cut to it (blocks included)."""
    if name not in TRACE_FORMATS:
        raise ValueError(f"unknown trace {name!r}; known: {', '.join(TRACE_FORMATS)}")
    fmt = TRACE_FORMATS[name]
    path = traces_dir / fmt.path
    if not path.is_file():
        raise TraceMissing(
            f"trace file {path} not found. The public traces are not part of the repository: put them "
            f"in {traces_dir} (see /work/shared/traces/README.md in the team workspace), point "
            f"LOADTEST_TRACES at a copy, or run without the trace user (name the other user classes on "
            f"the locust command line, e.g. `InteractiveChatUser BatchUser`).")
    rows = _read_rows(path)
    conversations: dict[object, list[TraceRequest]] = {}
    for index, row in enumerate(rows):
        request = _clip(_request(row, index), max_input_tokens, fmt.block_tokens)
        key = row.get("session_id", index)  # without sessions, each request is its own conversation
        conversations.setdefault(key, []).append(request)
    with_sessions = bool(rows) and "session_id" in rows[0]
    ordered = [(f"{name}-{key}" if with_sessions else None, tuple(requests))
               for key, requests in conversations.items()]
    return Trace(name, ordered, fmt.block_tokens, source)


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return [{"input_length": int(r["ContextTokens"]), "output_length": int(r["GeneratedTokens"])}
                    for r in csv.DictReader(f)]
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if rows and "turn" in rows[0]:
        rows.sort(key=lambda r: (r["timestamp"], r["turn"]))
    return rows


def _request(row: dict, index: int) -> TraceRequest:
    return TraceRequest(max(1, int(row["input_length"])), max(1, int(row["output_length"])),
                        tuple(row.get("hash_ids", ())), index)


def _clip(request: TraceRequest, max_input_tokens: int, block_tokens: int) -> TraceRequest:
    if request.input_tokens <= max_input_tokens:
        return request
    blocks = request.block_ids[:-(-max_input_tokens // block_tokens)] if block_tokens else ()
    return TraceRequest(max_input_tokens, request.output_tokens, blocks, request.index)
