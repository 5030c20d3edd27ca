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


@pytest.mark.parametrize("body, param", [
    (b'{"model": 3, "messages": []}', "model"),
    (b'{"model": "m", "messages": [{"role": 1}]}', "messages[0].role"),
    (b'{"model": "m", "messages": "hi"}', "messages"),
    (b'{"messages": []}', "model"),
    (b'{"model": "m", "messages": [], "stream": "yes"}', "stream"),
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
