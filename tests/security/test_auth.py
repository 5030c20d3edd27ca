"""Scenario 16, authentication: API keys are checked, never leak, can be revoked, and are scoped to roles.

Keys are issued by ``python -m gateway.keys new`` into a keys file that holds only their
peppered digests (``gateway/auth.py``). The timing test asks whether a wrong key's closeness to a valid
one shows in the gateway's answer time: a lookup that first finds a key by its prefix or id and then
compares (or hashes) slowly would answer a near miss measurably later than a random key.
"""

from __future__ import annotations

import math
import os
import random
import signal
import socket
import statistics
import time

import pytest

from tests.conftest import http_get
from tests.integration.test_errors import assert_openai_error, raw_request
from tests.security import bodiless_call, chat_request, keyed_stack

ATTEMPTS = 20000  # the brief's figure: about 3 s over loopback keep-alive here
SHARED_PREFIX = 30
KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


@pytest.fixture
def stack(simulator, gateway, tmp_path, monkeypatch):
    return keyed_stack(simulator, gateway, tmp_path, monkeypatch,
                       keys={"alice": [], "bob": [], "ops": ["--role", "admin"]})


def post_chat(port: int, key: str | None) -> tuple[int, dict[str, str], bytes]:
    return raw_request(port, chat_request(key=key))


def admin_call(stack, method: str, path: str, key: str | None) -> tuple[int, dict[str, str], bytes]:
    return bodiless_call(stack.gw.admin_port, method, path, key)


def test_missing_or_wrong_key_is_401_invalid_api_key_and_reaches_no_engine(stack):
    """Scenario 16: no key, an unknown key, another scheme, an over-long key: 401 invalid_api_key with
    ``WWW-Authenticate: Bearer``; a valid key gets through."""
    port = stack.gw.port
    valid = stack.keys["alice"]
    refused = [post_chat(port, None), post_chat(port, valid[:-1] + ("A" if valid[-1] != "A" else "B")),
               post_chat(port, "x" * 600),
               raw_request(port, chat_request(extra=b"Authorization: Basic %s\r\n" % valid.encode()))]
    for status, headers, body in refused:
        assert status == 401
        assert headers["www-authenticate"] == "Bearer"
        assert headers["x-should-retry"] == "false"
        error = assert_openai_error(body, code="invalid_api_key")
        assert error["type"] == "authentication_error"
    assert stack.sim.stats(0)["requests"] == 0
    assert post_chat(port, valid)[0] == 200


def welch_p_value(a: list[float], b: list[float]) -> tuple[float, float]:
    """Two-sided p-value of Welch's t-test and the standard error of the difference of means.

    With thousands of samples per side the t distribution is the normal one to four decimals, so the
    p-value is ``erfc(|t| / sqrt 2)`` (scipy is not a dependency)."""
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    t = (statistics.fmean(a) - statistics.fmean(b)) / se
    return math.erfc(abs(t) / math.sqrt(2)), se


def timed_401s(port: int, requests: dict[str, bytes], order: list[str]) -> dict[str, list[float]]:
    """Send the requests named by ``order`` on one keep-alive connection; seconds per 401 by name."""
    times: dict[str, list[float]] = {name: [] for name in requests}
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for name in order:
            start = time.perf_counter()
            s.sendall(requests[name])
            data = b""
            while (end := data.find(b"\r\n\r\n")) < 0 or len(data) < end + 4 + int(
                    data.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
                data += s.recv(65536)
            times[name].append(time.perf_counter() - start)
            assert data.startswith(b"HTTP/1.1 401")
    return times


def test_wrong_key_sharing_a_30_byte_prefix_with_a_valid_key_times_like_a_random_wrong_key(stack):
    """Scenario 16: 20 000 attempts, half with a wrong key whose first 30 bytes are a valid key's, half
    with a random wrong key of the same length and format, in shuffled order on one keep-alive
    connection. Welch's t-test cannot tell the two apart (p > 0.01).

    Both samples are cropped at their pooled 90th percentile (as dudect does): scheduler stalls on a
    shared machine hit both classes alike but dominate the variance, and a leak shifts the whole
    distribution, below the crop too. The test must also be able to see a difference: the standard
    error of the difference is asserted below 5 us, so a leak of 15 us or more (t >= 3; a slow hash
    run only for keys whose id exists, say) would be caught."""
    valid = stack.keys["alice"]
    rng = random.Random(20_000)
    def random_tail(prefix: str) -> str:
        return prefix + "".join(rng.choice(KEY_ALPHABET) for _ in range(len(valid) - len(prefix)))

    near, far = random_tail(valid[:SHARED_PREFIX]), random_tail("sk-egw-")
    assert near != valid and len(near) == len(far) == len(valid)
    order = ["near", "far"] * (ATTEMPTS // 2)
    rng.shuffle(order)
    times = timed_401s(stack.gw.port, {"near": chat_request(key=near), "far": chat_request(key=far)}, order)
    cut = sorted(times["near"] + times["far"])[int(0.90 * ATTEMPTS)]
    near_t = [t for t in times["near"] if t <= cut]
    far_t = [t for t in times["far"] if t <= cut]
    p, se = welch_p_value(near_t, far_t)
    means_us = (statistics.fmean(near_t) * 1e6, statistics.fmean(far_t) * 1e6)
    assert se < 5e-6, f"too noisy to resolve a timing leak: standard error {se * 1e6:.1f} us"
    assert p > 0.01, f"near-miss and random keys differ: means {means_us} us, p = {p:.4f}"


def test_no_log_line_and_no_engine_request_contains_a_test_key(stack):
    """Scenario 16: after valid, wrong, near-miss and admin-key traffic on both listeners, a grep of
    everything the gateway wrote (stdout and stderr) finds none of the keys, nor their secret parts;
    the keys file holds digests only; and the engine never sees the client's Authorization."""
    valid, admin = stack.keys["alice"], stack.keys["ops"]
    near = valid[:SHARED_PREFIX] + "Z" * (len(valid) - SHARED_PREFIX)
    for key in (valid, near, admin, "sk-egw-ghost-" + "q" * 43):
        post_chat(stack.gw.port, key)
        admin_call(stack, "GET", "/admin/endpoints", key)
    time.sleep(0.5)  # the access log is flushed a few times a second
    stack.gw.stop()
    written = stack.gw.log() + stack.keys_file.read_text()
    secret_parts = [key[len(f"sk-egw-{key_id}-"):] for key_id, key in stack.keys.items()]
    assert all(len(part) >= 40 for part in secret_parts)
    assert [s for s in (valid, near, admin, *secret_parts) if s in written] == []
    for record in stack.sim.requests(0):
        assert valid not in str(record["headers"])
        assert "authorization" not in {h.lower() for h in record["headers"]}


def wait_for_log(gw, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in gw.log():
        assert time.monotonic() < deadline, f"no log line with {text!r}"
        time.sleep(0.05)


def revoke(stack, key_id: str) -> None:
    """Rewrite the keys file without ``key_id``'s line, by rename (what auth.py asks operators to do)."""
    kept = [line for line in stack.keys_file.read_text().splitlines() if f'"id":"{key_id}"' not in line]
    staged = stack.keys_file.with_suffix(".new")
    staged.write_text("\n".join(kept) + "\n")
    os.replace(staged, stack.keys_file)


def test_revoked_key_is_rejected_after_one_sighup_reload(stack):
    """Scenario 16: delete a key's line, send one SIGHUP; once the reload is logged, the very next
    request with that key is 401, and other keys are unaffected."""
    alice, bob = stack.keys["alice"], stack.keys["bob"]
    assert post_chat(stack.gw.port, alice)[0] == 200
    revoke(stack, "alice")
    os.kill(stack.gw.proc.pid, signal.SIGHUP)
    wait_for_log(stack.gw, '"via":"SIGHUP"')
    assert post_chat(stack.gw.port, alice)[0] == 401
    assert post_chat(stack.gw.port, bob)[0] == 200


def test_revoked_key_is_rejected_after_one_admin_api_reload(stack):
    """Scenario 16: delete a key's line, call ``POST /admin/keys/reload`` once with the admin key; the
    answer counts one removed key and the next request with the revoked key is 401."""
    alice = stack.keys["alice"]
    assert post_chat(stack.gw.port, alice)[0] == 200
    revoke(stack, "alice")
    status, _, body = admin_call(stack, "POST", "/admin/keys/reload", stack.keys["ops"])
    assert status == 200, body
    assert b'"removed":1' in body.replace(b" ", b"")
    assert post_chat(stack.gw.port, alice)[0] == 401


def test_user_key_on_the_admin_listener_is_403_and_no_key_is_401(stack):
    """Scenario 16: a valid user key may not use the admin API (403 permission_error); without a key
    the admin API answers 401."""
    status, _, body = admin_call(stack, "GET", "/admin/endpoints", stack.keys["alice"])
    assert status == 403
    assert assert_openai_error(body)["type"] == "permission_error"
    status, _, body = admin_call(stack, "POST", "/admin/drain", None)
    assert status == 401
    assert_openai_error(body, code="invalid_api_key")
    assert http_get(f"{stack.gw.url}/readyz")[0] == 200  # the refused drain did not happen


def test_admin_key_is_accepted_on_the_admin_listener(stack):
    """Scenario 16: the admin-role key lists the endpoints."""
    status, _, body = admin_call(stack, "GET", "/admin/endpoints", stack.keys["ops"])
    assert status == 200, body
    assert b'"pool":"s"' in body.replace(b" ", b"")
