"""Request decoding: only routing fields are typed; bad input becomes a 400 that names the field."""

from __future__ import annotations

import pytest

from gateway import protocol
from gateway.errors import GatewayError


def test_chat_decodes_routing_fields_and_ignores_unknown_ones():
    req = protocol.decode_chat(
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],'
        b'"stream":true,"tools":[{"type":"function"}],"response_format":{"type":"json_object"},"user":"u1"}')
    assert req.model == "m" and req.stream and req.user == "u1"
    assert req.messages[0].content[0].text == "hi"


def test_null_in_an_optional_field_reads_as_absent_as_the_api_allows():
    req = protocol.decode_chat(
        b'{"model":"m","messages":[{"role":"user","content":null}],"stream":null,"stream_options":null,'
        b'"service_tier":null,"max_tokens":null,"max_completion_tokens":null,"n":null,"user":null}')
    assert (req.stream, req.max_tokens, req.n, req.user) == (None, None, None, None)
    assert protocol.decode_completion(
        b'{"model":"m","prompt":"p","stream":true,"stream_options":{"include_usage":null}}').stream


@pytest.mark.parametrize("body, param", [
    (b'{"model": 3, "messages": []}', "model"),
    (b'{"model": "m", "messages": [{"role": 1}]}', "messages[0].role"),
    (b'{"model": "m", "messages": "hi"}', "messages"),
    (b'{"messages": []}', "model"),
    (b'{"model": "m", "messages": [], "stream": "yes"}', "stream"),
    (b'{"model": "m", "messages": [], "n": 0}', "n"),
    (b'{"model": "m", "messages": [], "max_tokens": -1}', "max_tokens"),
])
def test_wrong_field_type_is_invalid_request_with_param(body, param):
    with pytest.raises(GatewayError) as e:
        protocol.decode_chat(body)
    assert e.value.kind.status == 400
    assert e.value.param == param


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"model": "m",}'])
def test_malformed_json_is_invalid_json(body):
    with pytest.raises(GatewayError) as e:
        protocol.decode_chat(body)
    assert e.value.kind.status == 400
    assert e.value.kind.code == "invalid_json"


@pytest.mark.parametrize("prompt, text", [
    ("abc", "abc"),
    (["a", "b"], "a\x1eb"),
    ([1, 2, 3], "1\x1e2\x1e3"),
])
def test_completion_prompt_forms_have_a_canonical_text(prompt, text):
    assert protocol.completion_text(prompt) == text


@pytest.mark.parametrize("body, choices", [
    (b'{"model":"m","prompt":"abc"}', 1),
    (b'{"model":"m","prompt":"abc","n":3}', 3),
    (b'{"model":"m","prompt":"abc","n":null}', 1),
    (b'{"model":"m","prompt":["a","b"],"n":2}', 4),
    (b'{"model":"m","prompt":[[1,2],[3]],"n":2}', 4),
    (b'{"model":"m","prompt":[1,2,3],"n":2}', 2),  # token ids of one prompt
])
def test_choice_count_is_n_per_prompt_of_a_batch(body, choices):
    assert protocol.choice_count(protocol.decode_completion(body)) == choices


def chat_with_image(url: str) -> protocol.ChatRequest:
    return protocol.decode_chat(
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"look"},'
        b'{"type":"image_url","image_url":{"url":"%s"}}]}]}' % url.encode())


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://localhost:8080/x.png",
    "https://localhost/x.png",
    "file:///etc/passwd",
    "http://[::1]/x.png",
    "https://[::1]/x.png",
    "https://10.0.0.7/x.png",
    "https://images.example.com.evil.net/x.png",
    "https://user:pw@images.example.com/x.png",
    "https://images.example.com:8443/x.png",
    "gopher://images.example.com/",
])
def test_media_urls_outside_the_allow_list_are_400_naming_the_field(url):
    with pytest.raises(GatewayError) as e:
        protocol.check_media(chat_with_image(url), frozenset({"images.example.com"}))
    assert e.value.kind.status == 400
    assert e.value.param == "messages[0].content[1].image_url.url"


@pytest.mark.parametrize("url", ["data:image/png;base64,iVBORw0KGgo=", "https://images.example.com/cat.png",
                                 "https://cdn.images.example.com/cat.png"])
def test_data_uris_and_allow_listed_https_hosts_pass(url):
    protocol.check_media(chat_with_image(url), frozenset({"images.example.com"}))


def test_json_nested_too_deeply_is_400_not_a_crash():
    body = b'{"model":"m","messages":[],"x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(GatewayError) as e:
        protocol.decode_chat(body)
    assert e.value.kind.status == 400


def test_too_many_messages_is_400_naming_messages():
    body = b'{"model":"m","messages":[' + b",".join([b'{"role":"user","content":"x"}'] * 10001) + b"]}"
    with pytest.raises(GatewayError) as e:
        protocol.decode_chat(body)
    assert e.value.param == "messages"
