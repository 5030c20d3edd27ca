"""Routing keys: chained block hashes of a prompt's prefix, and session-key hashes. Pure functions.

Prefix keys
-----------
The prompt's canonical text (``chat_text`` for chat messages, the prompt itself for completions) is
capped at ``max_chars`` characters and cut into consecutive blocks ``b_1 .. b_n``. Each block's key
chains the previous one::

    h_0 = xxh3_64(utf8(model))
    h_i = xxh3_64(utf8(b_i), seed=h_{i-1})        i = 1 .. n

so ``h_i`` stands for the whole prefix ``b_1 .. b_i`` of that model: two prompts share ``h_i`` exactly
when (up to a 2**-64 collision) they share their first ``i`` blocks, and a lookup of one key answers
"is this whole prefix known?". A trailing partial block is kept as the last key: it matches only a
prompt with the same text up to the same point (a repeated prompt), never a longer one, and it gives
a prompt shorter than one block (even an empty one) exactly one key. No tokenizer is involved: the
engine's cache works on tokens, but prompts with the same leading characters have the same leading
tokens, which is all routing needs.

Block sizes. The first ``UNIFORM_BLOCKS`` (16) blocks are ``block_chars`` long: that is where system
prompts end and conversations start to differ, and precision pays. After that each block is about an
eighth of the prefix before it (rounded down to a multiple of ``block_chars``), so the number of
keys grows with the logarithm of the length: with 256-character blocks, 4 KiB of text gives 16
keys, 8 KiB 23, 32 KiB 35, 128 KiB 47 (uniform blocks: 32, 128, 512). The boundaries depend only on
``block_chars`` and ``max_chars`` (``block_ends``), so every request cuts the same way. What coarse
deep blocks lose is small: a conversation's next turn still matches its previous turn up to the last
boundary before the previous prompt's end (at most an eighth of it short), and prompts that first
differ deep inside a long shared prefix are told apart up to an eighth of that prefix later.

Cost: one pass over at most ``max_chars`` characters and one xxh3 call per key (about 0.2 us each
in CPython, dominated by the call, not the bytes); each key also costs an index entry later. ASCII
text (the common case) is encoded once and sliced as bytes; other text is encoded per block.
``block_chars`` trades precision (a short common header still groups requests with small blocks)
against keys per request; 256 characters is about 64 tokens of English, in the range engines page
their KV cache by. ``max_chars`` bounds the work: prompts that agree on their first ``max_chars``
characters are treated as equal.

Chat canonical form
-------------------
Each message is written as ``R<role>`` followed by its content. Text is written as it is, then a
terminator: ``S<text>`` for string content, ``N`` for none, and for a list of parts ``T<text>`` per
text part, ``O<type><marker>`` per other part, then ``E``. Role, type and marker are short and
length-prefixed (``<len>:<text>``, a netstring without the trailing comma); a text ends with the
two characters NUL NUL, and a NUL inside it is written NUL SOH, so no text can fake a role or
message boundary. Text is not length-prefixed on purpose: two messages that start alike (the same
document followed by different questions) then share their canonical text up to where they differ,
as the engine's cache shares their tokens; with the length in front they would share nothing of
that message. A conversation's canonical text starts with the canonical text of each of its
earlier turns, so the next turn matches the previous one's blocks. A non-text part's marker is a
hash of its payload (image URL, audio data, file id), so the same image matches and two images do
not collide, while a multi-megabyte data URL adds 16 characters, not megabytes, to the text.

Use: ``prefix_hashes(model, chat_text(messages, max_chars), block_chars, max_chars)`` for chat,
``prefix_hashes(model, prompt_text, block_chars, max_chars)`` for completions, and
``key_hash(session_key)`` for a session key.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from functools import lru_cache
from itertools import islice
from typing import Any

from xxhash import xxh3_64_hexdigest, xxh3_64_intdigest

# Blocks are block_chars long for the first UNIFORM_BLOCKS blocks; after that each block is about
# 1/GROWTH of the prefix before it (rounded down to a multiple of block_chars).
UNIFORM_BLOCKS = 16
GROWTH = 8

# Attributes under which an OpenAI non-text part keeps its payload, in the order they are tried:
# image_url.url, input_audio.data, file.file_id / file.file_data.
_PAYLOAD_FIELDS = ("url", "data", "file_id", "file_data")


def prefix_hashes(model: str, text: str, block_chars: int, max_chars: int) -> list[int]:
    """Chained 64-bit keys of the consecutive blocks of ``text[:max_chars]`` (module docstring).

    Key ``i`` (0-based) identifies the whole prefix ``text[:block_ends(...)[i]]`` for ``model``.
    The last key covers a trailing partial block if there is one; the list is never empty.
    """
    seed = xxh3_64_intdigest(model.encode())
    capped = text[:max_chars]
    if not capped:
        return [xxh3_64_intdigest(b"", seed)]
    ends, spans = _schedule(block_chars, max_chars)
    count = bisect_left(ends, len(capped)) + 1
    if capped.isascii():
        # One encode; then byte offsets are character offsets (slicing bytes beats slicing and
        # encoding str per block by about a third).
        data = capped.encode()
        return [seed := xxh3_64_intdigest(data[a:b], seed) for a, b in islice(spans, count)]
    return [seed := xxh3_64_intdigest(capped[a:b].encode(), seed) for a, b in islice(spans, count)]


def block_ends(block_chars: int, max_chars: int) -> tuple[int, ...]:
    """Character offset where each block ends: key ``i`` of ``prefix_hashes`` covers
    ``text[:block_ends(...)[i]]`` (so a match of depth ``d`` is ``block_ends(...)[d - 1]`` characters)."""
    return _schedule(block_chars, max_chars)[0]


# The boundaries depend only on the two settings, so they are computed once per pair, not per request.
@lru_cache(maxsize=16)
def _schedule(block_chars: int, max_chars: int) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    if block_chars < 1 or max_chars < 1:
        raise ValueError(f"block_chars and max_chars must be positive, got {block_chars}, {max_chars}")
    spans: list[tuple[int, int]] = []
    start = 0
    while start < max_chars:
        size = block_chars
        if len(spans) >= UNIFORM_BLOCKS:
            size = max(block_chars, start // GROWTH // block_chars * block_chars)
        end = min(start + size, max_chars)
        spans.append((start, end))
        start = end
    return tuple(end for _, end in spans), tuple(spans)


def chat_text(messages: Iterable[Any], max_chars: int | None = None) -> str:
    """Canonical text of chat messages (format in the module docstring), duck-typed.

    Each message has ``.role: str`` and ``.content``: a ``str``, ``None``, or a list of parts with
    ``.type: str`` and ``.text: str | None``. A non-text part's payload is read from the attribute
    named by its type (``part.image_url.url``, ``part.input_audio.data``, ``part.file.file_id``); a
    part without a readable payload is marked by its type alone.

    With ``max_chars``, stops once that many characters are produced; the result is then the first
    ``max_chars`` characters of the full canonical text, so keys do not depend on the cap's use.
    """
    pieces: list[str] = []
    room = max_chars if max_chars is not None else -1
    for message in messages:
        role = message.role
        content = message.content
        # Head and body stay separate pieces, so that a long body is not copied again to put its head in front.
        if isinstance(content, str):
            head, body = f"R{len(role)}:{role}S", _text(content, room)
        elif content is None:
            head, body = f"R{len(role)}:{role}N", ""
        else:
            head, body = f"R{len(role)}:{role}", "".join([_part_text(p, room) for p in content]) + "E"
        if room >= 0:
            if len(head) + len(body) >= room:
                pieces.append((head + body[:max(room - len(head), 0)])[:room])
                break
            room -= len(head) + len(body)
        pieces.append(head)
        pieces.append(body)
    return "".join(pieces)


def _part_text(part: Any, room: int) -> str:
    kind = part.type
    if kind == "text":
        return "T" + _text(part.text or "", room)
    marker = _payload_marker(getattr(part, kind, None))
    return f"O{len(kind)}:{kind}{len(marker)}:{marker}"


def _text(text: str, room: int) -> str:
    """``text`` escaped and terminated (module docstring). Past ``room`` characters (when not -1)
    the output is cut anyway, so only the first ``room`` are escaped: escaping never shortens."""
    if 0 <= room < len(text):
        text = text[:room]
    return text.replace("\0", "\0\1") + "\0\0"


def _payload_marker(payload: Any) -> str:
    if isinstance(payload, str):
        return xxh3_64_hexdigest(payload.encode())
    for field in _PAYLOAD_FIELDS:
        value = getattr(payload, field, None)
        if isinstance(value, str) and value:
            return xxh3_64_hexdigest(value.encode())
    return ""


def key_hash(key: str) -> int:
    """64-bit ring key of a session key (the whole key is hashed: ``session-1`` and ``session-12``
    are unrelated)."""
    return xxh3_64_intdigest(key.encode())
