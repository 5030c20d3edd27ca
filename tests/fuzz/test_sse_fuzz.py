"""Properties of the SSE well-formedness check (``gateway/sse.py``) under every way a stream can be cut.

The relay feeds each upstream read to :class:`SseCheck` before forwarding it, and TCP may cut the
engine's bytes anywhere: inside a field name, between ``\\r`` and ``\\n``, inside a multi-byte UTF-8
character. So the check's answer must not depend on the cuts: a well-formed stream is accepted
however it is split, and a stream with a line that is not an SSE field, or with bytes that are not
UTF-8, is refused however it is split, at the latest by the read that completes the bad line.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import SseCheck

# CI sees the same examples every run (derandomize); raise max_examples for a longer search.
PROPERTY = settings(max_examples=1000, deadline=None, derandomize=True, database=None)

# Field values: any text without line breaks (SSE ends a line at CR, LF or CRLF), including
# characters of 2, 3 and 4 UTF-8 bytes that a cut can split.
VALUE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30)
FIELD_LINE = st.one_of(
    st.builds(lambda v: "data: " + v, VALUE),
    st.builds(lambda v: "data:" + v, VALUE),
    st.builds(lambda v: "event: " + v, VALUE),
    st.builds(lambda v: "id: " + v, VALUE),
    st.builds(lambda v: "retry: " + v, st.integers(0, 10**6).map(str)),
    st.builds(lambda v: ":" + v, VALUE),
)
EVENT = st.lists(FIELD_LINE, min_size=1, max_size=4)
NEWLINE = st.sampled_from(["\n", "\r\n"])


@st.composite
def sse_lines(draw) -> list[bytes]:
    """A well-formed stream as its lines, each with its terminator: events separated by blank lines."""
    newline = draw(NEWLINE)
    lines: list[bytes] = []
    for event in draw(st.lists(EVENT, min_size=1, max_size=6)):
        lines += [(line + newline).encode() for line in event] + [newline.encode()]
    return lines


@st.composite
def cuts(draw, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary byte offsets into consecutive reads."""
    points = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=12)))
    edges = [0, *[p for p in points if p < len(data)], len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def feed_all(reads: list[bytes]) -> list[bool]:
    check = SseCheck()
    return [check.feed(read) for read in reads]


@PROPERTY
@given(st.data())
def test_any_split_of_a_well_formed_stream_is_accepted(data):
    """Scenario 20: every read of a well-formed stream is accepted, wherever the cuts fall."""
    stream = b"".join(data.draw(sse_lines()))
    reads = data.draw(cuts(stream))
    assert feed_all(reads) == [True] * len(reads)


def first_refusal(reads: list[bytes]) -> tuple[int | None, int]:
    """(index of the first read refused, or None) and the stream offset where that read ends."""
    check, offset = SseCheck(), 0
    for i, read in enumerate(reads):
        offset += len(read)
        if not check.feed(read):
            return i, offset
    return None, offset


NOT_A_FIELD = st.one_of(
    st.sampled_from(["garbage", "{\"choices\": []}", "HTTP/1.1 200 OK", "Data: x", " data: x", "DATA:x",
                     "event x", "<html>", "[DONE]", "data"]),
    VALUE.filter(lambda v: v and not v.startswith(("data:", ":", "event:", "id:", "retry:"))),
)


@PROPERTY
@given(st.data())
def test_a_line_that_is_not_an_sse_field_is_refused_by_the_read_that_completes_it(data):
    """Scenario 20: a non-SSE line anywhere in a stream is refused however the stream is cut: no read
    before the bad line is refused, and the read that brings the line's end is (or an earlier one)."""
    lines = data.draw(sse_lines())
    at = data.draw(st.integers(0, len(lines)))
    bad = data.draw(NOT_A_FIELD).encode() + data.draw(NEWLINE).encode()
    stream = b"".join(lines[:at]) + bad + b"".join(lines[at:])
    bad_starts = len(b"".join(lines[:at]))
    reads = data.draw(cuts(stream))
    refused_at, read_end = first_refusal(reads)
    assert refused_at is not None
    assert read_end > bad_starts, "a read before the bad line was refused"
    assert read_end - len(reads[refused_at]) < bad_starts + len(bad), "refused only after the bad line's end"


INVALID_UTF8 = st.sampled_from([b"\xff", b"\xfe", b"\xc3\x28", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80",
                                b"\xf4\x90\x80\x80", b"\x80", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98"])


@PROPERTY
@given(st.data())
def test_invalid_utf8_in_a_stream_is_refused_however_it_is_cut(data):
    """Scenario 20: bytes that are not UTF-8 inside a data line are refused, wherever the cuts fall,
    by the end of the line that holds them."""
    lines = data.draw(sse_lines())
    at = data.draw(st.integers(0, len(lines)))
    bad = b"data: ok " + data.draw(INVALID_UTF8) + b" tail\n\n"
    stream = b"".join(lines[:at]) + bad + b"".join(lines[at:])
    reads = data.draw(cuts(stream))
    refused_at, read_end = first_refusal(reads)
    assert refused_at is not None
    assert read_end - len(reads[refused_at]) < len(b"".join(lines[:at])) + len(bad)
