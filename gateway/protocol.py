"""The few request fields the gateway reads, decoded with msgspec; the raw body is forwarded as received.

Only what routing needs is typed here (model, messages or prompt, stream, session fields, service
tier). Every other field (tools, response_format, logprobs, ...) is skipped by the decoder and
reaches the engine untouched, because the engine receives the client's exact bytes.
"""

from __future__ import annotations

import re

import msgspec

from gateway.errors import GatewayError


class ImageUrl(msgspec.Struct):
    url: str = ""


class ContentPart(msgspec.Struct):
    type: str = "text"
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Generation(msgspec.Struct, kw_only=True):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    service_tier: str | None = None
    # Fields a deployment may name as session keys (routing.session_fields).
    user: str | None = None
    session_id: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatRequest(_Generation, kw_only=True):
    messages: list[Message]


class CompletionRequest(_Generation, kw_only=True):
    prompt: str | list[str | int | list[int]]


SESSION_FIELDS = ("user", "session_id", "prompt_cache_key", "safety_identifier")

_chat_decoder = msgspec.json.Decoder(ChatRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_PATH = re.compile(r"at `\$\.?(.*)`$")


def decode_chat(body: bytes) -> ChatRequest:
    return _decode(_chat_decoder, body)


def decode_completion(body: bytes) -> CompletionRequest:
    return _decode(_completion_decoder, body)


def _decode(decoder: msgspec.json.Decoder, body: bytes):
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        text = str(e)
        m = _PATH.search(text)
        param = m.group(1) if m and m.group(1) else None
        if param is None and "missing required field" in text:
            param = text.rsplit("`", 2)[-2]
        raise GatewayError("invalid_request", text, param) from None
    except msgspec.DecodeError as e:
        raise GatewayError("invalid_json", f"request body is not valid JSON: {e}") from None


def completion_text(prompt: str | list) -> str:
    """Canonical text of a completions prompt (token-id prompts hash by their decimal ids)."""
    if isinstance(prompt, str):
        return prompt
    return "\x1e".join(p if isinstance(p, str) else str(p) for p in prompt)
