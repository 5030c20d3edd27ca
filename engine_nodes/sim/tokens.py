"""Prompt rendering, the simulator's tokenisation rule, and its seeded output text.

No model is downloaded, so the simulator cannot run a real tokenizer. It needs three properties of
one, and this module provides exactly those, cheaply:

1. **A chat template.** Each message renders as ``<|{role}|>\\n{content}\\n`` (content parts of type
   ``text`` are concatenated; other parts are rendered as their JSON, so an image URL still changes
   the prompt), followed by the generation prompt ``<|assistant|>\\n``. A multi-turn conversation is
   therefore a byte-prefix of its continuation, as with real templates, so it hits the prefix cache.
2. **Token counts and prefix-stable token boundaries.** One token is four UTF-8 bytes of the rendered
   prompt (the last token may be shorter): ``prompt_tokens = ceil(len(utf8) / 4)``. Four bytes is
   about the average English BPE token of Llama-3's 128k vocabulary. Equal byte prefixes give equal
   token prefixes, which is the property a prefix cache depends on.
3. **Page keys.** A KV page holds ``page_size`` tokens, i.e. ``4 * page_size`` bytes. Only full pages
   are cacheable (as in SGLang's paged radix cache and vLLM's block hashes). Page ``i`` is keyed by a
   hash chain ``k_i = xxh3_64(bytes of page i, seed=k_{i-1})`` with ``k_{-1}`` derived from the model
   name, so a key identifies the page *and everything before it*. Cost: one xxh3 call per 64 bytes.

Output text is seeded: ``output_words(seed, model, prompt, n)`` draws ``n`` words from a fixed
vocabulary with a ``random.Random`` seeded by ``xxh3_64(prompt, seed)`` and the model. Each output
token is one word with a leading space, so concatenated stream deltas equal the non-stream text, and
the first ``k`` words do not depend on ``n`` (``choices`` draws sequentially).
"""

from __future__ import annotations

import random

import orjson
import xxhash

BYTES_PER_TOKEN = 4

_WORDS = (
    "the of and to in is was for on are as with his they at be this from have or by one had not but "
    "what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much go good new write our me man "
    "too any day same right look think also around another came come work three word must because "
    "does part even place well such here take why help put different away again off went old number "
    "great tell men say small every found still between name should home big give air line set own "
    "under read last never us left end along while might next sound below saw something thought both "
    "few those always show large often together asked house world going want school important until "
    "form food keep children feet land side without boy once animal life enough took four head above "
    "kind began almost live page got earth need far hand high year mother light country father let "
    "night picture being study second soon story since white ever paper hard near sentence better best"
).split()
OUTPUT_VOCABULARY: tuple[str, ...] = tuple(" " + w for w in _WORDS)


class PromptError(ValueError):
    """The request body has no usable prompt; the engine answers 400."""


def _content_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                parts.append(orjson.dumps(part, option=orjson.OPT_SORT_KEYS).decode())
        return "".join(parts)
    raise PromptError("message content must be a string or a list of content parts")


def render_chat(messages: object) -> bytes:
    """Apply the simulator's chat template to an OpenAI ``messages`` list."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise PromptError("each message must be an object with a string role")
        out.append(f"<|{message['role']}|>\n{_content_text(message.get('content'))}\n")
    out.append("<|assistant|>\n")
    return "".join(out).encode()


def render_prompts(prompt: object) -> list[bytes]:
    """A ``/v1/completions`` prompt, as the engines accept it: a string or token ids (one prompt), or a
    list of strings or of token-id lists (a batch, each prompt its own sequences)."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [_render_prompt(p) for p in prompt]
    return [_render_prompt(prompt)]


def _render_prompt(prompt: object) -> bytes:
    if isinstance(prompt, str) and prompt:
        return prompt.encode()
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        # Token ids map back to four bytes each, so the count is preserved exactly.
        return b"".join((t & 0xFFFFFFFF).to_bytes(4, "little") for t in prompt)
    raise PromptError("prompt must be a non-empty string or list of token ids, or a list of those")


def token_count(prompt: bytes) -> int:
    return max(1, -(-len(prompt) // BYTES_PER_TOKEN))


def page_keys(prompt: bytes, page_size: int, salt: int) -> list[int]:
    """Chained keys of the full pages of ``prompt`` (see the module docstring)."""
    page_bytes = page_size * BYTES_PER_TOKEN
    keys = []
    key = salt
    for start in range(0, len(prompt) - page_bytes + 1, page_bytes):
        key = xxhash.xxh3_64_intdigest(prompt[start:start + page_bytes], seed=key)
        keys.append(key)
    return keys


def model_salt(model: str) -> int:
    return xxhash.xxh3_64_intdigest(model.encode())


def prompt_digest(seed: int, model: str, prompt: bytes) -> int:
    return xxhash.xxh3_64_intdigest(prompt, seed=(seed ^ model_salt(model)) & 0xFFFFFFFFFFFFFFFF)


def output_words(digest: int, n: int) -> list[str]:
    """The first ``n`` output tokens for a prompt digest; a prefix of the list for any larger ``n``."""
    return random.Random(digest).choices(OUTPUT_VOCABULARY, k=n)
