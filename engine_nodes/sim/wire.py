"""The exact JSON each engine flavour puts on the wire for the OpenAI API.

The two engines serialise the same OpenAI objects differently, and clients (and our gateway) see the
difference, so each flavour is rendered as its server does:

- **SGLang** (``python/sglang/srt/entrypoints/openai/protocol.py`` and ``serving_chat.py``) dumps
  its pydantic models whole (``model_dump_json()``): every chunk carries ``"usage": null``, the delta
  carries ``role``, ``content``, ``reasoning_content`` and ``tool_calls`` (null when unset), and each
  choice has ``matched_stop``. Ids are bare uuid hex. Usage has ``reasoning_tokens``. Errors are flat:
  ``{"object": "error", "message", "type", "param", "code"}``.
- **vLLM** (``vllm/entrypoints/openai/serving_chat.py``) dumps chunks with ``exclude_unset=True``:
  no ``usage`` key on ordinary chunks, deltas with only the fields set, ``stop_reason`` on the final
  choice, and the usage chunk with ``exclude_none`` too. Ids are ``chatcmpl-``/``cmpl-`` followed by
  the request's ``X-Request-Id`` when one is sent. Errors are nested:
  ``{"error": {"message", "type", "param", "code"}}``.

Both engines report ``prompt_tokens_details.cached_tokens`` only when launched with
``--enable-cache-report`` (SGLang) or ``--enable-prompt-tokens-details`` (vLLM); the simulator
behaves as if they were, always.

Where the simulator departs from the engines, on purpose: the final chunk always has an empty delta
(vLLM puts the last token in it), and a completions stream ends with an empty-text chunk carrying
``finish_reason``, mirroring chat.

Hot path: per request, ``StreamTemplate`` serialises a token chunk once with a placeholder and
splits it, so each token costs one ``orjson.dumps`` of a short string and two concatenations.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

import orjson

Flavor = Literal["sglang", "vllm"]
_SLOT = "\u0001slot\u0001"
_SLOT_JSON = orjson.dumps(_SLOT)
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Reply:
    """Identity shared by every chunk of one response."""

    id: str
    created: int
    model: str
    chat: bool


def sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class StreamTemplate:
    """A token chunk serialised once around a placeholder for the token text."""

    __slots__ = ("_head", "_tail")

    def __init__(self, chunk: dict[str, object]) -> None:
        self._head, self._tail = sse(chunk).split(_SLOT_JSON)

    def render(self, text: str) -> bytes:
        return self._head + orjson.dumps(text) + self._tail


class Wire:
    """Renders responses, stream chunks and errors for one engine flavour."""

    def __init__(self, flavor: Flavor) -> None:
        self.flavor = flavor
        self.sglang = flavor == "sglang"

    # -- ids and envelopes ---------------------------------------------------------------

    def response_id(self, chat: bool, unique_hex: str, request_id_header: str | None) -> str:
        if self.sglang:
            return unique_hex
        return ("chatcmpl-" if chat else "cmpl-") + (request_id_header or unique_hex)

    def _envelope(self, reply: Reply, choices: list[object]) -> dict[str, object]:
        obj: dict[str, object] = {
            "id": reply.id,
            "object": "chat.completion.chunk" if reply.chat else "text_completion",
            "created": reply.created,
            "model": reply.model,
            "choices": choices,
        }
        if self.sglang:
            obj["usage"] = None
        return obj

    def usage(self, u: Usage) -> dict[str, object]:
        out: dict[str, object] = {
            "prompt_tokens": u.prompt_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "completion_tokens": u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        }
        if self.sglang:
            out["reasoning_tokens"] = 0
        return out

    # -- streaming -----------------------------------------------------------------------

    def _delta(self, role: str | None, content: str | None) -> dict[str, object]:
        if self.sglang:
            return {"role": role, "content": content, "reasoning_content": None, "tool_calls": None}
        delta: dict[str, object] = {}
        if role is not None:
            delta["role"] = role
        if content is not None:
            delta["content"] = content
        return delta

    def _stream_choice(self, reply: Reply, index: int, text: str | None, role: str | None,
                       finish_reason: str | None) -> dict[str, object]:
        choice: dict[str, object] = {"index": index}
        if reply.chat:
            choice["delta"] = self._delta(role, text)
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        if self.sglang:
            choice["matched_stop"] = None
        elif finish_reason is not None or not reply.chat:
            choice["stop_reason"] = None
        return choice

    def role_chunk(self, reply: Reply, index: int) -> bytes | None:
        """A chat choice's opening chunk; completions streams have none."""
        if not reply.chat:
            return None
        return sse(self._envelope(reply, [self._stream_choice(reply, index, "", "assistant", None)]))

    def token_template(self, reply: Reply, index: int) -> StreamTemplate:
        return StreamTemplate(self._envelope(reply, [self._stream_choice(reply, index, _SLOT, None, None)]))

    def finish_chunk(self, reply: Reply, index: int, finish_reason: str) -> bytes:
        return sse(self._envelope(reply, [self._stream_choice(reply, index, None, None, finish_reason)]))

    def usage_chunk(self, reply: Reply, u: Usage) -> bytes:
        obj = self._envelope(reply, [])
        obj["usage"] = self.usage(u)
        return sse(obj)

    # -- whole responses -----------------------------------------------------------------

    def response(self, reply: Reply, texts: list[str], finish_reason: str, u: Usage) -> dict[str, object]:
        obj: dict[str, object] = {
            "id": reply.id,
            "object": "chat.completion" if reply.chat else "text_completion",
            "created": reply.created,
            "model": reply.model,
            "choices": [self._choice(reply, index, text, finish_reason) for index, text in enumerate(texts)],
        }
        if self.sglang:
            obj["usage"] = self.usage(u)
            obj["metadata"] = None
        else:
            obj["service_tier"] = None
            obj["system_fingerprint"] = None
            obj["usage"] = self.usage(u)
            if reply.chat:
                obj["prompt_logprobs"] = None
            obj["kv_transfer_params"] = None
        return obj

    def _choice(self, reply: Reply, index: int, text: str, finish_reason: str) -> dict[str, object]:
        choice: dict[str, object] = {"index": index}
        if reply.chat:
            if self.sglang:
                choice["message"] = {"role": "assistant", "content": text, "reasoning_content": None,
                                     "tool_calls": None}
            else:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None,
                                     "annotations": None, "audio": None, "function_call": None,
                                     "tool_calls": [], "reasoning_content": None}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        if self.sglang:
            choice["matched_stop"] = None
        else:
            choice["stop_reason"] = None
            if not reply.chat:
                choice["prompt_logprobs"] = None
        return choice

    def error(self, status: int, message: str, param: str | None = None) -> dict[str, object]:
        err_type = error_type(status, self.flavor)
        if self.sglang:
            return {"object": "error", "message": message, "type": err_type, "param": param, "code": status}
        return {"error": {"message": message, "type": err_type, "param": param, "code": status}}

    def models(self, model: str, model_path: str, max_model_len: int, created: int) -> dict[str, object]:
        card: dict[str, object] = {
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": self.flavor,
            "root": model if self.sglang else model_path,
            "parent": None,
            "max_model_len": max_model_len,
        }
        if not self.sglang:
            card["permission"] = [{
                "id": f"modelperm-{model}", "object": "model_permission", "created": created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False,
            }]
        return {"object": "list", "data": [card]}


def error_type(status: int, flavor: Flavor) -> str:
    """``NotFoundError``, ``BadRequestError``, ... as vLLM names them; SGLang drops the suffix for 400."""
    try:
        phrase = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        phrase = "Unknown"
    if flavor == "sglang" and status == 400:
        return "BadRequest"
    return phrase if phrase.endswith("Error") else phrase + "Error"
