"""Fuzzing request decoding: ``protocol.decode_chat`` / ``decode_completion``, ``check_media`` and the
routing text built from a decoded request, i.e. everything the gateway does with a body before admission.

The property: whatever the bytes, decoding either succeeds (and the routing text and keys can be
built from the result) or raises ``GatewayError`` with status 400 and an OpenAI error body whose
``param`` is a string or null. Any other exception would be a 500 from the public listener; a hang
would stall the event loop.

Nightly (10 minutes; atheris 3 on Python 3.11), on a copy of the corpus so that CI's stays curated::

    cp -r tests/fuzz/decode_corpus /tmp/decode_corpus
    python -m tests.fuzz.test_decode_fuzz -max_total_time=600 -timeout=5 /tmp/decode_corpus

libFuzzer adds inputs that reach new lines of the instrumented gateway modules to that directory and
stops at the first crash, writing a ``crash-*`` file: fix it and add the file to ``decode_corpus``
(``chat_invalid_utf8`` and ``completion_invalid_utf8_found_by_atheris`` came this way: msgspec's
UnicodeDecodeError once escaped as a 500). msgspec's decoder is C code that atheris does not
instrument, so the search is guided by the Python around it (error mapping, media checks, routing
text) and by the seeds' structure; the hypothesis searches below complement it with structured JSON
documents. In CI (pytest) the corpus replays in well under 30 s.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import affinity, errors, protocol

CORPUS = Path(__file__).with_name("decode_corpus")
MEDIA_HOSTS = frozenset({"images.example.com"})
MAX_PREFIX_CHARS = 32768  # settings.Routing.max_prefix_chars
BLOCK_CHARS = 256  # settings.Routing.block_chars
REPLAY_BUDGET_S = 30.0
CHAT, COMPLETION = 0, 1


def decode_request(data: bytes) -> int:
    """The fuzz target. The first byte picks the route (even: chat, odd: completions), the rest is the
    request body. Returns 200 on success or 400 for a well-formed 400; anything else escapes as a
    failure."""
    if not data:
        return 200
    route, body = data[0] % 2, data[1:]
    try:
        if route == CHAT:
            request = protocol.decode_chat(body)
            protocol.check_media(request, MEDIA_HOSTS)
            text = affinity.chat_text(request.messages, MAX_PREFIX_CHARS)
        else:
            request = protocol.decode_completion(body)
            text = protocol.completion_text(request.prompt)
        affinity.prefix_hashes(request.model, text, BLOCK_CHARS, MAX_PREFIX_CHARS)
    except errors.GatewayError as e:
        assert e.kind.status == 400, (e.kind, e.message)
        error = orjson.loads(e.body())["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] is None or isinstance(error["param"], str)
        return 400
    return 200


def corpus_inputs() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.is_file())


def test_decode_corpus_replays_cleanly_in_under_30_s():
    """Scenario 20: every corpus input (seeds, crashes found since, and whatever nightly fuzzing
    added) decodes or is a 400; the whole replay takes under 30 s."""
    inputs = corpus_inputs()
    assert len(inputs) >= 20
    start = time.monotonic()
    for path in inputs:
        decode_request(path.read_bytes())
    assert time.monotonic() - start < REPLAY_BUDGET_S


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20)
URLS = st.text(max_size=30) | st.sampled_from([
    "data:image/png;base64,AAAA", "https://images.example.com/a.png", "http://169.254.169.254/",
    "file:///etc/passwd", "https://[::1]/", "https://images.example.com:8443/", "https://",
    "https://user@images.example.com/", "http://[::1", "https://%zz/", ""])


def field_or_junk(value: st.SearchStrategy) -> st.SearchStrategy:
    """A field's plausible value most of the time, any JSON value sometimes."""
    return st.one_of(value, value, value, JSON_VALUES)


MEDIA = field_or_junk(st.fixed_dictionaries({"url": URLS}))
PART = st.fixed_dictionaries(
    {"type": field_or_junk(st.sampled_from(
        ["text", "image_url", "video_url", "audio_url", "input_audio", "file"]))},
    optional={"text": field_or_junk(st.text(max_size=40)), "image_url": MEDIA, "video_url": MEDIA,
              "audio_url": MEDIA})
MESSAGE = st.fixed_dictionaries(
    {"role": field_or_junk(st.sampled_from(["system", "user", "assistant", "tool"]))},
    optional={"content": field_or_junk(st.text(max_size=60) | st.lists(PART, max_size=4) | st.none())})
COMMON = {
    "stream": field_or_junk(st.booleans()),
    "max_tokens": field_or_junk(st.integers()),
    "max_completion_tokens": field_or_junk(st.integers()),
    "service_tier": field_or_junk(st.text(max_size=8)),
    "user": field_or_junk(st.text(max_size=20)),
    "stream_options": field_or_junk(st.fixed_dictionaries({"include_usage": st.booleans()})),
}
PROMPT_ITEM = st.text(max_size=20) | st.integers(min_value=0) | st.lists(st.integers(min_value=0), max_size=5)
CHAT_DOC = st.fixed_dictionaries(
    {"model": field_or_junk(st.text(max_size=20)), "messages": field_or_junk(st.lists(MESSAGE, max_size=4))},
    optional=COMMON)
COMPLETION_DOC = st.fixed_dictionaries(
    {"model": field_or_junk(st.text(max_size=20)),
     "prompt": field_or_junk(st.text(max_size=60) | st.lists(PROMPT_ITEM, max_size=4))},
    optional=COMMON)


# derandomize: CI sees the same examples every run; fuzzing for new inputs is atheris's job.
@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.tuples(st.just(CHAT), CHAT_DOC), st.tuples(st.just(COMPLETION), COMPLETION_DOC)),
       st.sampled_from([b"", b"]", b"}", b"\x00", b"\xff"]))
def test_structured_requests_decode_or_are_a_400(route_and_doc, tail):
    """Scenario 20 (hypothesis): chat and completion documents with the right shape most of the time and
    junk in any field, sometimes with a trailing byte breaking the JSON, decode or are a clean 400."""
    route, doc = route_and_doc
    decode_request(bytes([route]) + json.dumps(doc).encode() + tail)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_are_a_400(data):
    """Scenario 20 (hypothesis): raw bytes, for what the structured search never writes."""
    assert decode_request(data) in (200, 400)


def instrument(*modules) -> None:
    """Coverage instrumentation for the functions and methods defined in ``modules`` only: the modules
    are imported already, and instrumenting everything loaded (hypothesis included) takes minutes."""
    import atheris

    for module in modules:
        for value in vars(module).values():
            if getattr(value, "__module__", None) != module.__name__:
                continue
            members = vars(value).values() if inspect.isclass(value) else [value]
            for function in members:
                if inspect.isfunction(function):
                    atheris.instrument_func(function)


if __name__ == "__main__":
    import atheris

    instrument(protocol, affinity, errors, sys.modules[__name__])
    atheris.Setup(sys.argv, decode_request)
    atheris.Fuzz()
