"""Scenario 19, SSRF guard: media URLs that would make an engine fetch inside the cluster never reach one.

Engines fetch ``image_url`` / ``video_url`` / ``audio_url`` themselves (vLLM's MediaConnector; both
engines follow redirects and reach private addresses by default), so the gateway lets through only
``data:`` URIs and https URLs on allow-listed host names (``protocol.check_media``), and answers
anything else with 400 ``invalid_request_error`` naming the field, before routing.

Redirects: the gateway cannot know where an allow-listed host redirects to, because it never
fetches. A URL on a host that is *not* listed is refused whatever it would redirect to (checked
below); that an allow-listed host does not redirect into the cluster is the operator's duty when
listing it (or the engine's: vLLM's ``VLLM_MEDIA_URL_ALLOW_REDIRECTS=0``).
"""

from __future__ import annotations

import base64
import json
import random
import socket

import pytest

from tests.conftest import FAST_HEALTH, MODEL, pool_toml
from tests.integration.test_errors import assert_openai_error, post
from tests.security import shared_stack

ALLOWED_HOST = "images.example.com"
ALLOWLIST = f'[limits]\nmedia_url_allowlist = ["{ALLOWED_HOST}"]\n'


@pytest.fixture(scope="module")
def refusing(tmp_path_factory):
    """Shared by the refusal cases: the engine must see none of their requests, so its count stays 0."""
    with shared_stack(tmp_path_factory.mktemp("ssrf"), ALLOWLIST, flavor="vllm") as stack:
        yield stack


@pytest.fixture
def stack(simulator, gateway):
    sim = simulator("vllm")
    gw = gateway(FAST_HEALTH + ALLOWLIST + pool_toml("s", "vllm", "interactive", sim.urls))
    return sim, gw


def media_chat(*parts: dict, earlier_turns: int = 0) -> dict:
    """A chat whose last user message is a text part followed by ``parts``."""
    history = [{"role": "user", "content": f"turn {i}"} for i in range(earlier_turns)]
    return {"model": MODEL, "max_tokens": 2, "messages": history + [
        {"role": "user", "content": [{"type": "text", "text": "What is in this?"}, *parts]}]}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


BANNED = {
    "metadata_service": image("http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
    "localhost": image("http://localhost:9090/admin/drain"),
    "file_scheme": image("file:///etc/passwd"),
    "ipv6_loopback": image("http://[::1]:9090/metrics"),
    # A host that is not listed is refused whatever it redirects to.
    "unlisted_redirector": image("https://redirector.example.net/r?to=http%3A%2F%2F169.254.169.254%2F"),
    "https_ip_literal": image("https://127.0.0.1/x.png"),
    "ipv4_mapped_ipv6": image("https://[::ffff:169.254.169.254]/x.png"),
    "decimal_ip": image("https://2130706433/x.png"),
    "listed_name_as_prefix": image(f"https://{ALLOWED_HOST}.attacker.net/x.png"),
    "userinfo_before_ip": image(f"https://{ALLOWED_HOST}@169.254.169.254/x.png"),
    "https_on_other_port": image(f"https://{ALLOWED_HOST}:8443/x.png"),
    "video_url": {"type": "video_url", "video_url": {"url": "http://10.0.0.5/v.mp4"}},
    "audio_url": {"type": "audio_url", "audio_url": {"url": "http://10.0.0.5/a.wav"}},
    # vLLM also reads Responses-style parts whose image_url is a bare string.
    "input_image_string": {"type": "input_image", "image_url": "http://169.254.169.254/"},
}


@pytest.mark.parametrize("case", list(BANNED))
def test_media_url_into_the_cluster_is_400_naming_the_field_and_reaches_no_engine(refusing, case):
    """Scenario 19: each banned URL gets 400 invalid_request_error with ``param`` pointing into the
    message that holds it, and the engine receives nothing."""
    sim, gw = refusing
    status, headers, body = post(gw.port, json.dumps(media_chat(BANNED[case], earlier_turns=2)).encode())
    assert status == 400
    error = assert_openai_error(body)
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith("messages[2].content[1]."), error["param"]
    assert headers["x-should-retry"] == "false"
    assert sim.stats(0)["requests"] == 0


def test_duplicate_url_key_cannot_hide_a_banned_url_behind_an_allowed_one(refusing):
    """Scenario 19: with two ``url`` keys the gateway checks the one engines use (the last, as Python's
    and orjson's parsers keep), so an allowed first value cannot smuggle a banned second one."""
    sim, gw = refusing
    body = (b'{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": '
            b'"image_url", "image_url": {"url": "data:image/png;base64,AAAA", '
            b'"url": "http://169.254.169.254/"}}]}]}' % MODEL.encode())
    assert json.loads(body)["messages"][0]["content"][0]["image_url"]["url"] == "http://169.254.169.254/"
    status, _, answer = post(gw.port, body)
    assert status == 400
    assert_openai_error(answer, param="messages[0].content[0].image_url.url")
    assert sim.stats(0)["requests"] == 0


def test_data_image_and_allow_listed_https_url_are_forwarded_byte_for_byte(stack):
    """Scenario 19: a 192 KiB ``data:`` PNG (under the body limit, and within the simulated model's
    context, which counts it as text) and an https URL on the allow-listed host reach the engine in
    the request body exactly as the client sent it."""
    sim, gw = stack
    png = b"\x89PNG\r\n\x1a\n" + random.Random(19).randbytes(192 * 1024)
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    for request_id, url in (("data-image", data_uri), ("listed-host", f"https://{ALLOWED_HOST}/cat.png")):
        body = json.dumps(media_chat(image(url)), separators=(",", ":")).encode()
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                      b"X-Request-Id: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                      % (request_id.encode(), len(body)) + body)
            response = b""
            while chunk := s.recv(65536):
                response += chunk
        assert response.startswith(b"HTTP/1.1 200"), response[:300]
        (seen,) = [r for r in sim.requests(0) if r["headers"].get("x-request-id") == request_id]
        assert seen["body"].encode("latin-1") == body
