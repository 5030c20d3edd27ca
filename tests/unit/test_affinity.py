"""Prefix keys and the chat canonical form (gateway.affinity)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64_intdigest

from gateway.affinity import GROWTH, UNIFORM_BLOCKS, block_ends, chat_text, key_hash, prefix_hashes

BLOCK = 256
MAX = 32768


@dataclass
class Part:
    type: str
    text: str | None = None
    image_url: object = None


@dataclass
class ImageUrl:
    url: str


@dataclass
class Message:
    role: str
    content: str | list[Part] | None


def reference_hashes(model: str, text: str, block_chars: int, max_chars: int) -> list[int]:
    """The recurrence of the module docstring, written out plainly."""
    capped = text[:max_chars]
    h = xxh3_64_intdigest(model.encode())
    keys, start = [], 0
    for end in block_ends(block_chars, max_chars):
        h = xxh3_64_intdigest(capped[start:end].encode(), h)
        keys.append(h)
        if end >= len(capped):
            return keys
        start = end
    raise AssertionError("block_ends must reach max_chars")


def parse_chat_text(text: str) -> list[tuple[str, object]]:
    """Decode the canonical form back into (role, content); proves it is unambiguous."""
    pos = 0

    def netstring() -> str:
        nonlocal pos
        colon = text.index(":", pos)
        size = int(text[pos:colon])
        pos = colon + 1 + size
        assert pos <= len(text)
        return text[colon + 1:pos]

    def terminated() -> str:
        """Text up to NUL NUL, with each NUL SOH read back as NUL."""
        nonlocal pos
        out = []
        while text[pos:pos + 2] != "\0\0":
            if text[pos] == "\0":
                assert text[pos + 1] == "\1", "a NUL in text must be escaped"
                out.append("\0")
                pos += 2
            else:
                out.append(text[pos])
                pos += 1
        pos += 2
        return "".join(out)

    def tag() -> str:
        nonlocal pos
        pos += 1
        return text[pos - 1]

    messages: list[tuple[str, object]] = []
    while pos < len(text):
        assert tag() == "R"
        role = netstring()
        kind = tag()
        if kind == "S":
            messages.append((role, terminated()))
        elif kind == "N":
            messages.append((role, None))
        else:
            pos -= 1
            parts: list[tuple[str, str]] = []
            while (kind := tag()) != "E":
                if kind == "T":
                    parts.append(("text", terminated()))
                else:
                    assert kind == "O"
                    parts.append((netstring(), netstring()))
            messages.append((role, parts))
    return messages


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=1500)
ascii_texts = st.text(alphabet=st.characters(codec="ascii"), max_size=1500)


@settings(max_examples=60, deadline=None)
@given(text=st.one_of(texts, ascii_texts), block=st.integers(1, 300), cap=st.integers(1, 2000))
def test_keys_follow_the_documented_recurrence_for_any_text(text, block, cap):
    assert prefix_hashes("m", text, block, cap) == reference_hashes("m", text, block, cap)


@settings(max_examples=60, deadline=None)
@given(common=st.text(min_size=1, max_size=3000), a=st.text(max_size=500), b=st.text(max_size=500))
def test_prompts_share_exactly_the_keys_of_their_shared_whole_blocks(common, a, b):
    ka, kb = prefix_hashes("m", common + a, 64, MAX), prefix_hashes("m", common + b, 64, MAX)
    ends = block_ends(64, MAX)
    whole = sum(1 for end in ends if end <= len(common))
    assert ka[:whole] == kb[:whole]
    if (common + a)[:ends[whole]] != (common + b)[:ends[whole]]:
        assert ka[whole] != kb[whole]


def test_model_seeds_the_chain_so_models_share_no_keys():
    text = "same prompt " * 100
    assert not set(prefix_hashes("llama", text, BLOCK, MAX)) & set(prefix_hashes("qwen", text, BLOCK, MAX))


def test_prompt_shorter_than_one_block_and_empty_prompt_get_one_key_each():
    assert len(prefix_hashes("m", "hi", BLOCK, MAX)) == 1
    assert len(prefix_hashes("m", "", BLOCK, MAX)) == 1
    assert prefix_hashes("m", "", BLOCK, MAX) != prefix_hashes("m", "hi", BLOCK, MAX)


def test_trailing_partial_block_matches_only_the_identical_prompt():
    turn = "x" * 300
    longer = turn + "y" * 100
    assert prefix_hashes("m", turn, BLOCK, MAX)[0] == prefix_hashes("m", longer, BLOCK, MAX)[0]
    assert prefix_hashes("m", turn, BLOCK, MAX)[1] != prefix_hashes("m", longer, BLOCK, MAX)[1]
    assert prefix_hashes("m", turn, BLOCK, MAX) == prefix_hashes("m", turn, BLOCK, MAX)


def test_text_past_max_chars_is_not_hashed():
    head = "a" * 5000
    assert prefix_hashes("m", head + "tail one", BLOCK, 5000) == prefix_hashes("m", head + "other", BLOCK, 5000)


def test_blocks_are_uniform_then_grow_so_keys_grow_with_log_of_length():
    ends = block_ends(BLOCK, 131072)
    assert ends[:UNIFORM_BLOCKS] == tuple(BLOCK * (i + 1) for i in range(UNIFORM_BLOCKS))
    assert ends[-1] == 131072
    for start, end in zip(ends[UNIFORM_BLOCKS - 1:-1], ends[UNIFORM_BLOCKS:-1]):
        assert end % BLOCK == 0
        assert BLOCK <= end - start <= max(BLOCK, start // GROWTH)
    counts = [len(prefix_hashes("m", "z" * n, BLOCK, 131072)) for n in (4096, 8192, 32768, 131072)]
    assert counts == [16, 23, 35, 47]


def test_keys_are_stable_across_releases_so_replicas_of_two_versions_agree():
    # Golden values: changing the scheme reshuffles every prefix and session during a rolling update.
    assert prefix_hashes("m", "hello world", 4, 64) == [0x493F47C4C3F3405A, 0xAA824A8BA8B9E240, 0x1CFBB5F0C6217EBE]
    assert key_hash("session-1") == 0xC07EA64948C9A305


def test_session_keys_sharing_a_prefix_are_unrelated():
    assert key_hash("session-1") != key_hash("session-12")
    assert (key_hash("session-1") ^ key_hash("session-12")).bit_count() > 16


roles = st.sampled_from(["system", "user", "assistant", "tool", "R1:x", ":", "S"])
# Text that may hold NULs and the terminator itself, so the escaping is exercised.
message_texts = st.text(alphabet=st.sampled_from(["a", ":", "R", "S", "\0", "\1", "é"]) | st.characters(), max_size=40)
contents = st.one_of(
    st.none(),
    message_texts,
    st.lists(st.one_of(st.builds(Part, type=st.just("text"), text=st.one_of(st.none(), message_texts)),
                       st.builds(Part, type=st.just("image_url"),
                                 image_url=st.builds(ImageUrl, url=st.text(min_size=1, max_size=30)))),
             max_size=3),
)
conversations = st.lists(st.builds(Message, role=roles, content=contents), max_size=5)


@settings(max_examples=150, deadline=None)
@given(messages=conversations)
def test_canonical_chat_text_decodes_back_so_no_content_can_forge_a_boundary(messages):
    decoded = parse_chat_text(chat_text(messages))
    assert [role for role, _ in decoded] == [m.role for m in messages]
    for (_, content), message in zip(decoded, messages):
        if isinstance(message.content, list):
            assert [kind for kind, _ in content] == [p.type for p in message.content]
            assert [v for (k, v) in content if k == "text"] == [p.text or "" for p in message.content
                                                                 if p.type == "text"]
        else:
            assert content == message.content


def test_text_that_looks_like_a_message_boundary_does_not_collide():
    forged = [Message("user", "hi\0\0R6:systemSok")]
    real = [Message("user", "hi"), Message("system", "ok")]
    assert chat_text(forged) != chat_text(real)
    assert chat_text(real) == "R4:userShi\0\0R6:systemSok\0\0"


@settings(max_examples=60, deadline=None)
@given(common=st.text(min_size=1, max_size=3000), a=st.text(max_size=300), b=st.text(max_size=300))
def test_messages_that_start_alike_share_the_keys_of_their_common_start(common, a, b):
    """The same document followed by different questions, in one user message: the engine caches
    the document's tokens for both, and routing must see the shared prefix too."""
    system = Message("system", "Answer from the document.")
    first, second = (chat_text([system, Message("user", common + tail)]) for tail in (a, b))
    shared = len(chat_text([system])) + len("R4:userS") + len(common.replace("\0", "\0\1"))
    assert first[:shared] == second[:shared]
    whole_blocks = sum(end <= shared for end in block_ends(BLOCK, MAX))
    assert prefix_hashes("m", first, BLOCK, MAX)[:whole_blocks] == prefix_hashes("m", second, BLOCK, MAX)[:whole_blocks]


@settings(max_examples=60, deadline=None)
@given(messages=conversations, more=conversations)
def test_next_turn_canonical_text_starts_with_the_previous_turn(messages, more):
    assert chat_text(messages + more).startswith(chat_text(messages))


@settings(max_examples=100, deadline=None)
@given(messages=conversations, cap=st.integers(0, 400))
def test_capped_chat_text_is_the_prefix_of_the_full_text(messages, cap):
    assert chat_text(messages, cap) == chat_text(messages)[:cap]


def test_same_image_matches_and_different_images_do_not():
    def ask(url: str) -> str:
        return chat_text([Message("user", [Part("text", "what is this?"), Part("image_url", image_url=ImageUrl(url))])])

    cat = "data:image/png;base64," + "A" * 100000 + "cat"
    dog = "data:image/png;base64," + "A" * 100000 + "dog"
    assert ask(cat) == ask(cat)
    assert ask(cat) != ask(dog)
    assert len(ask(cat)) < 100, "a data URL must add a fixed-size marker, not its bytes"


def test_part_without_payload_is_marked_by_its_type():
    audio = chat_text([Message("user", [Part("input_audio")])])
    image = chat_text([Message("user", [Part("image_url")])])
    assert audio != image
