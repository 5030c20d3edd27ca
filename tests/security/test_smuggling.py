"""Scenario 15, request smuggling: ambiguous HTTP/1.1 framing never lets a hidden request reach an engine.

Each case of the corpus is one write on a fresh connection: a *front* request whose head is malformed
or ambiguous, followed by bytes that a parser reading the framing the other way would take for a
second, *smuggled* chat request. Both carry their own ``x-request-id``, and the simulator records the
``x-request-id`` of every request it receives, so the test knows exactly which requests got through.

The promise checked for every case: the gateway answers 400 ``bad_request`` with ``Connection: close``
and closes (RFC 9112 section 6.1 requires the close after CL+TE whatever the answer), the engine
receives neither the front nor the smuggled request, and so receives exactly as many requests as the
gateway accepted (zero). ``tests/integration/test_server.py`` checks the
minimal forms of four of these; here every case carries a real hidden request.

The gateway never forwards client bytes: it re-frames each request it accepts with its own
Content-Length (``relay.py``), so a smuggle could only happen if its parser (llhttp, strict mode)
accepted an ambiguous head. That is what the corpus probes.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.conftest import MODEL
from tests.security import shared_stack

BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
SMUGGLED = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Request-Id: smuggled\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def front(*header_lines: bytes, body: bytes = b"") -> bytes:
    """The front request: the common head, ``header_lines``, then ``body``."""
    return HEAD + b"X-Request-Id: front\r\n" + b"".join(h + b"\r\n" for h in header_lines) + b"\r\n" + body


# name -> the bytes written on one connection. Where a case has a body, a parser that took the
# other framing would end the front early and read SMUGGLED as the next request.
CORPUS: dict[str, bytes] = {
    # CL.TE: CL covers everything, chunked ends at "0": the rest would be a second request.
    "cl_and_te": front(b"Content-Length: %d" % (5 + len(SMUGGLED)), b"Transfer-Encoding: chunked",
                       body=b"0\r\n\r\n" + SMUGGLED),
    # TE.CL: chunked covers the smuggled request, CL=4 ends the front after the chunk size line.
    "te_and_cl": front(b"Transfer-Encoding: chunked", b"Content-Length: 4",
                       body=chunk(SMUGGLED) + b"0\r\n\r\n"),
    "cl_cl_differing": front(b"Content-Length: 0", b"Content-Length: %d" % len(SMUGGLED), body=SMUGGLED),
    "cl_as_a_list": front(b"Content-Length: 0, %d" % len(SMUGGLED), body=SMUGGLED),
    "te_xchunked": front(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n" + SMUGGLED),
    "te_chunked_then_identity": front(b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n" + SMUGGLED),
    "te_chunked_twice": front(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked",
                              body=b"0\r\n\r\n" + SMUGGLED),
    "te_space_before_colon": front(b"Transfer-Encoding : chunked", b"Content-Length: %d" % len(BODY),
                                   body=BODY),
    # obs-fold (RFC 9112 section 5.2: a server must reject it or replace it by spaces).
    "obs_fold_te": front(b"Transfer-Encoding:", b" chunked", body=b"0\r\n\r\n" + SMUGGLED),
    "obs_fold_other_header": front(b"X-Folded: a", b" b", b"Content-Length: %d" % len(BODY), body=BODY),
    # A bare LF ends a header line for lenient parsers; here it would hide the CL from one of them.
    "bare_lf_line_end": front(b"X-Note: x\nContent-Length: 0", b"Transfer-Encoding: chunked",
                              body=b"0\r\n\r\n" + SMUGGLED),
    "bare_lf_everywhere": front(b"Content-Length: %d" % len(BODY), body=BODY).replace(b"\r\n", b"\n"),
    "nul_in_header_value": front(b"X-Bad: a\x00b", b"Content-Length: %d" % len(BODY), body=BODY + SMUGGLED),
    "invalid_chunk_size": front(b"Transfer-Encoding: chunked", body=b"zz\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"),
    # RFC 9112 section 3.2: one hop may route by the first Host and the next read the second.
    "duplicate_host": front(b"Host: internal.example", b"Content-Length: %d" % len(BODY), body=BODY),
    "missing_host": front(b"Content-Length: %d" % len(BODY), body=BODY).replace(b"Host: gw\r\n", b""),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with shared_stack(tmp_path_factory.mktemp("smuggling"), "[timeouts]\nrequest_read_s = 2.0\n") as stack:
        yield stack


def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[list[bytes], bool]:
    """Write ``data``, read until the server closes; the status lines seen and whether it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        received, closed = b"", False
        try:
            while chunk_ := s.recv(65536):
                received += chunk_
            closed = True
        except (socket.timeout, ConnectionResetError):
            closed = False
    return [line for line in received.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")], closed


def engine_ids(sim, prefix: str) -> list[str]:
    return [r["headers"].get("x-request-id", "") for r in sim.requests(0)
            if r["headers"].get("x-request-id", "").startswith(prefix)]


def tagged(data: bytes, case: str) -> bytes:
    """The case's bytes with ids unique to this case, so cases sharing a gateway cannot mix."""
    return data.replace(b"X-Request-Id: front", b"X-Request-Id: front-" + case.encode()).replace(
        b"X-Request-Id: smuggled", b"X-Request-Id: smuggled-" + case.encode())


@pytest.mark.parametrize("case", list(CORPUS))
def test_ambiguous_framing_is_400_and_closed_and_no_request_reaches_the_engine(stack, case):
    """Scenario 15: every corpus case gets 400 with Connection: close, then the connection closes;
    the engine receives neither the front nor the smuggled request."""
    sim, gw = stack
    statuses, closed = exchange(gw.port, tagged(CORPUS[case], case))
    assert statuses == [b"HTTP/1.1 400 Bad Request"]
    assert closed
    time.sleep(0.2)  # let any request the gateway might have forwarded arrive before counting
    assert engine_ids(sim, f"front-{case}") == []
    assert engine_ids(sim, f"smuggled-{case}") == []


def test_smuggled_request_in_a_pipelined_tail_never_reaches_the_engine(stack):
    """Scenario 15, pipelined tail: a valid request followed, in the same write, by a CL+TE request
    hiding a third one. The malformed tail closes the connection (gateway/server.py ``reject``:
    a request is in flight, so there is no 400, only the close), the hidden request never reaches
    the engine, and the engine gets the valid front request at most once, only if the gateway
    accepted it (its access-log line names the engine it was sent to).

    The close also cancels the valid front request, so its client may get no answer: documented
    behaviour of ``reject`` (answer if possible, else close), safe but unlike HAProxy, which answers
    the requests before the bad one."""
    sim, gw = stack
    tail = (HEAD + b"X-Request-Id: tail\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
            % (5 + len(SMUGGLED)) + b"0\r\n\r\n" + SMUGGLED)
    valid = HEAD + b"X-Request-Id: front\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
    statuses, closed = exchange(gw.port, tagged(valid + tail, "tail"))
    assert closed
    assert statuses in ([], [b"HTTP/1.1 200 OK"], [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"])
    deadline = time.monotonic() + 3
    while not (logged := [r for r in gw.access_log() if r["request_id"] == "front-tail"]):
        assert time.monotonic() < deadline, "the accepted front request has no access-log line"
        time.sleep(0.05)
    reached = engine_ids(sim, "front-tail")
    assert len(reached) <= 1
    if reached:
        assert logged[0]["endpoint"], "the engine got a request the gateway never sent it"
    assert engine_ids(sim, "tail") == []
    assert engine_ids(sim, "smuggled-tail") == []
