"""The few request fields the gateway reads, decoded with msgspec; the raw body is forwarded as received.

Only what routing and admission need is typed here (model, messages or prompt, stream, session fields,
service tier, and max_tokens and n for a key's token estimate). Every other field (tools,
response_format, logprobs, echo, ...) is skipped by the decoder and reaches the engine untouched,
because the engine receives the client's exact bytes. Where the API lets a field be null, null
reads as absent.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import urlsplit

import msgspec

from gateway.errors import GatewayError

# Size caps on what is decoded; the body limit (limits.max_body_bytes) bounds everything else, and
# JSON nested deeper than msgspec's recursion limit (about 1,000 levels) is refused as a 400.
MAX_MESSAGES = 10000
MAX_PARTS = 1000
URL_PARTS = ("image_url", "video_url", "audio_url")


class ImageUrl(msgspec.Struct):
    url: str = ""


class ContentPart(msgspec.Struct):
    type: str = "text"
    text: str | None = None
    # URL-bearing parts: engines fetch these (vLLM's MediaConnector, SGLang's loaders), so the gateway
    # decides which URLs may reach them (see check_media).
    image_url: ImageUrl | None = None
    video_url: ImageUrl | None = None
    audio_url: ImageUrl | None = None


class Message(msgspec.Struct):
    role: str
    content: str | Annotated[list[ContentPart], msgspec.Meta(max_length=MAX_PARTS)] | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _Generation(msgspec.Struct, kw_only=True):
    model: str
    stream: bool | None = None  # null, as every optional field here, reads as absent: the API allows it
    stream_options: StreamOptions | None = None
    service_tier: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None  # 0: with echo, the prompt alone back
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1)] | None = None  # samples per prompt; null means one, as for engines
    # Fields a deployment may name as session keys (routing.session_fields).
    user: str | None = None
    session_id: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatRequest(_Generation, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(max_length=MAX_MESSAGES)]


class CompletionRequest(_Generation, kw_only=True):
    prompt: str | list[str | int | list[int]]


def choice_count(request: ChatRequest | CompletionRequest) -> int:
    """Completions the engine writes: ``n`` for each prompt (a completions prompt may be a batch of
    strings or of token-id lists; a flat list of token ids is one prompt)."""
    prompt = getattr(request, "prompt", None)
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return (request.n or 1) * prompts


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
    except RecursionError:
        raise GatewayError("invalid_json", "request body is nested too deeply") from None
    except UnicodeDecodeError:
        raise GatewayError("invalid_json", "request body is not valid UTF-8") from None


def check_media(request: ChatRequest, allowed_hosts: frozenset[str]) -> None:
    """Only ``data:`` URIs, or https URLs to an allow-listed host name, may reach an engine.

    Engines fetch media URLs themselves (CVE-2025-6242; vLLM and SGLang follow redirects and reach
    private addresses by default), so a client must not be able to point them at the cluster's
    insides: IP literals, ``localhost``, other schemes (``file:``, ``http:``) and unlisted hosts are
    refused with 400 naming the field.
    """
    for i, message in enumerate(request.messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            for field in URL_PARTS:
                media = getattr(part, field)
                if media is not None and not _media_url_allowed(media.url, allowed_hosts):
                    raise GatewayError(
                        "invalid_request",
                        f"{field} must be a data: URI or an https URL on an allowed host",
                        f"messages[{i}].content[{j}].{field}.url")


def _media_url_allowed(url: str, allowed_hosts: frozenset[str]) -> bool:
    if url.startswith("data:"):
        return True
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").rstrip(".").lower()
    if parts.scheme != "https" or not host or parts.username or parts.password or port not in (None, 443):
        return False
    try:
        ipaddress.ip_address(host)
        return False
    except ValueError:
        pass
    return host in allowed_hosts or any(host.endswith("." + h) for h in allowed_hosts)


def completion_text(prompt: str | list) -> str:
    """Canonical text of a completions prompt (token-id prompts hash by their decimal ids)."""
    if isinstance(prompt, str):
        return prompt
    return "\x1e".join(p if isinstance(p, str) else str(p) for p in prompt)
