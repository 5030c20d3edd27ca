"""Trace requests -> HTTP request bodies whose text reproduces the trace's prefix sharing.

Traces
------
Both traces list requests as ``timestamp`` (ms), ``input_length``, ``output_length`` and
``hash_ids``: chained block hashes, so equal ids at position ``i`` mean equal text up to the end of
block ``i``.

- **Mooncake** (``../shared/traces/mooncake``): 512-token blocks, long document prompts. Every
  reuse happens inside a *prefix group* (requests with the same first id: one document and its
  questions, or one ShareGPT chat), because an id names its whole prefix. Subsampling keeps one in
  ``group_sample`` groups (chosen by a hash of the first id, so the choice is deterministic and
  unbiased), which cuts the request count by that factor while keeping every reuse of a kept
  group, i.e. the cache-hit structure. A window would instead cut off reuses whose first use falls
  outside it (reuse distances are hundreds of requests here).
- **hh-rlhf sessions** (``../shared/traces/hh_rlhf``): ~16-token blocks, multi-turn chats with a
  ``session_id``; turn ``n``'s prompt is the whole dialogue so far. Subsampling keeps the first
  ``max_requests`` requests of whole sessions (sessions started in order, all their turns).

Scaling
-------
``block_tokens`` is the size of one trace block in the replay. Mooncake's 512-token blocks scale
down by ``block_tokens / 512`` (input lengths with them), so prompts stay within a small CPU budget
while keeping their shape; hh-rlhf keeps its 16. ``max_blocks`` caps a prompt's blocks (the shared
part of a prompt is at its front), ``max_output_tokens`` caps outputs. Arrival times are divided by
``rate_scale`` (simulated time = trace time / rate_scale): it sets the load the simulated engines
see, independently of how fast the replay runs on this machine (``--speed``).

Text
----
Block ``id`` becomes ``4 * block_tokens`` bytes of lowercase words drawn by a ``random.Random``
seeded with ``(trace, id)``: equal ids give equal text, distinct ids distinct text (up to the odds
of two random word sequences agreeing). Under the simulator's rule of four bytes per token
(``engine_nodes/sim/tokens.py``) a block is exactly ``block_tokens`` tokens, a whole number of
16-token KV pages, so trace blocks and KV pages line up. The trailing partial block is a prefix of
its full text. Cost: one RNG draw per word, once per distinct id (texts are memoised).

- Mooncake requests go to ``/v1/completions`` with the raw text as ``prompt`` (no chat template, so
  block boundaries are page boundaries).
- hh-rlhf requests go to ``/v1/chat/completions`` as a chat that grows turn by turn: the prompt of
  turn ``t`` is split into messages at the points where each earlier turn stopped sharing text with
  its successor, so turn ``t + 1`` repeats the messages of turn ``t`` except the last, which it
  repeats up to the shared point. Every message is a ``user`` message (roles would otherwise depend
  on the turn count). Each request carries ``X-Session-ID``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import orjson
import xxhash

BYTES_PER_TOKEN = 4
MOONCAKE_BLOCK_TOKENS = 512
HH_BLOCK_TOKENS = 16
NO_CAP = 1 << 30

_WORDS = (
    "able acid aged also area army away baby back ball band bank base bath bear beat been beer bell belt "
    "best bill bird blow blue boat body bomb bond bone book boom born boss both bowl bulk burn bush busy "
    "cafe cake call calm came camp card care case cash cast cell chat chip city club coal coat code cold "
    "come cook cool cope copy core cost crew crop dark data date dawn days dead deal dean dear debt deep "
    "deny desk dial diet disc disk does done door dose down draw drew drop drug dual duke dust duty each "
    "earn ease east easy edge else even ever evil exit face fact fail fair fall farm fast fate fear feed "
    "feel feet fell felt file fill film find fine fire firm fish five flat flow food foot ford form fort "
    "four free from fuel full fund gain game gate gave gear gene gift girl give glad goal goes gold golf "
    "gone good gray grew grey grow gulf hair half hall hand hang hard harm hate have head hear heat held "
    "hell help here hero high hill hire hold hole holy home hope host hour huge hung hunt hurt idea inch "
    "into iron item jack jane jean john join jump jury just keen keep kent kept kick kill kind king knee"
).split()


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace, after sampling and scaling."""

    arrival_s: float  # simulated seconds from the first kept request
    blocks: tuple[int, ...]  # trace hash ids, at most max_blocks
    input_tokens: int
    output_tokens: int
    session: int | None = None
    turn: int = 0


@dataclass(frozen=True)
class Shaping:
    """How a trace is cut down to the replay (every field is printed in the report header)."""

    block_tokens: int
    max_requests: int
    group_sample: int = 1  # keep 1 in this many prefix groups (Mooncake)
    max_blocks: int = NO_CAP
    max_output_tokens: int = NO_CAP
    rate_scale: float = 1.0


@dataclass(frozen=True)
class Rendered:
    """A trace request ready to send: path, JSON body, headers, and the bytes the engine tokenises."""

    request: TraceRequest
    path: str
    body: bytes
    headers: dict[str, str]
    prompt_text: str  # the whole prompt text (a completion's prompt; a chat's messages joined)
    messages: tuple[str, ...] | None  # chat: message contents; None for a completion


def load_mooncake(path: Path, shaping: Shaping) -> list[TraceRequest]:
    scale = shaping.block_tokens / MOONCAKE_BLOCK_TOKENS
    kept: list[TraceRequest] = []
    origin: float | None = None
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            ids = row["hash_ids"]
            if not ids or xxhash.xxh64_intdigest(str(ids[0]).encode()) % shaping.group_sample:
                continue
            blocks = tuple(ids[: shaping.max_blocks])
            full = len(ids) <= shaping.max_blocks
            tokens = math.ceil(row["input_length"] * scale) if full else len(blocks) * shaping.block_tokens
            # Keep len(blocks) == ceil(tokens / block_tokens), the trace's own invariant, after rounding.
            tokens = max(tokens, (len(blocks) - 1) * shaping.block_tokens + 1)
            tokens = min(tokens, len(blocks) * shaping.block_tokens)
            ts = row["timestamp"] / 1000.0
            origin = ts if origin is None else origin
            kept.append(
                TraceRequest(
                    arrival_s=(ts - origin) / shaping.rate_scale,
                    blocks=blocks,
                    input_tokens=tokens,
                    output_tokens=max(1, min(row["output_length"], shaping.max_output_tokens)),
                )
            )
            if len(kept) == shaping.max_requests:
                break
    return kept


def load_sessions(path: Path, shaping: Shaping) -> list[TraceRequest]:
    """hh-rlhf turns of whole sessions, in arrival order, up to about ``max_requests`` requests."""
    rows = [json.loads(line) for line in path.open()]
    rows.sort(key=lambda r: r["timestamp"])
    first_seen: dict[int, int] = {}
    turns: dict[int, int] = {}
    for row in rows:
        sid = row["session_id"]
        first_seen.setdefault(sid, len(first_seen))
        turns[sid] = turns.get(sid, 0) + 1
    kept_sessions: set[int] = set()
    budget = shaping.max_requests
    for sid in sorted(first_seen, key=first_seen.__getitem__):
        if turns[sid] > budget:
            break
        kept_sessions.add(sid)
        budget -= turns[sid]
    out: list[TraceRequest] = []
    origin: float | None = None
    for row in rows:
        if row["session_id"] not in kept_sessions:
            continue
        ts = row["timestamp"] / 1000.0
        origin = ts if origin is None else origin
        ids = tuple(row["hash_ids"][: shaping.max_blocks])
        tokens = min(row["input_length"], len(ids) * shaping.block_tokens)
        out.append(
            TraceRequest(
                arrival_s=(ts - origin) / shaping.rate_scale,
                blocks=ids,
                input_tokens=tokens,
                output_tokens=max(1, min(row["output_length"], shaping.max_output_tokens)),
                session=row["session_id"],
                turn=row["turn"],
            )
        )
    return out


class BlockText:
    """Deterministic text per block id (module docstring, "Text")."""

    def __init__(self, trace: str, block_tokens: int):
        self.salt = xxhash.xxh64_intdigest(trace.encode())
        self.block_bytes = block_tokens * BYTES_PER_TOKEN
        self._memo: dict[int, str] = {}

    def block(self, block_id: int) -> str:
        text = self._memo.get(block_id)
        if text is None:
            rng = random.Random(self.salt ^ (block_id * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF))
            words: list[str] = []
            size = 0
            while size < self.block_bytes:
                word = rng.choice(_WORDS)
                words.append(word)
                size += len(word) + 1
            text = " ".join(words)[: self.block_bytes - 1] + " "
            self._memo[block_id] = text
        return text

    def prompt(self, blocks: tuple[int, ...], tokens: int) -> str:
        """The text of ``blocks``, cut to ``tokens`` tokens (the last block may be partial)."""
        return "".join(self.block(b) for b in blocks)[: tokens * BYTES_PER_TOKEN]


def render(requests: list[TraceRequest], text: BlockText, model: str) -> list[Rendered]:
    """Bodies for every request, in order (sessions are rendered as growing chats)."""
    out: list[Rendered] = []
    # Per session: block ids of the previous turn and the message boundaries (in blocks) so far.
    previous: dict[int, tuple[tuple[int, ...], list[int]]] = {}
    for req in requests:
        sampling = {
            "model": model,
            "max_tokens": req.output_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if req.session is None:
            prompt = text.prompt(req.blocks, req.input_tokens)
            body = orjson.dumps({**sampling, "prompt": prompt})
            out.append(Rendered(req, "/v1/completions", body, {}, prompt, None))
            continue
        prior_blocks, cuts = previous.get(req.session, ((), [0]))
        shared = len(os.path.commonprefix([prior_blocks, req.blocks]))
        # Boundaries past the shared point no longer hold; the shared point becomes one.
        cuts = sorted({c for c in cuts if c < shared} | {shared} | {0})
        full = text.prompt(req.blocks, req.input_tokens)
        bounds = [c * text.block_bytes for c in cuts] + [len(full)]
        messages = tuple(full[a:b] for a, b in itertools.pairwise(bounds) if b > a)
        previous[req.session] = (req.blocks, cuts)
        body = orjson.dumps({**sampling, "messages": [{"role": "user", "content": m} for m in messages]})
        out.append(
            Rendered(req, "/v1/chat/completions", body, {"X-Session-ID": f"hh-{req.session}"}, full, messages)
        )
    return out
