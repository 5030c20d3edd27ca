"""The route step (gateway.router): what it hands the pool's policy, checked on real pools and policies."""

from __future__ import annotations

import orjson
import pytest

from gateway import protocol
from gateway import settings as cfg
from gateway.app import build_policy
from gateway.pool import Pool
from gateway.relay import Call
from gateway.router import INTERACTIVE, Router


def router(routing: cfg.Routing) -> tuple[Router, Pool]:
    pool = Pool(cfg.Pool(name="chat", engine="sglang", role="interactive", models=["m"],
                         endpoints=[f"http://10.0.0.{i}:30000" for i in range(4)]),
                build_policy("prefix", routing))
    for endpoint in pool.endpoints:
        endpoint.healthy = True
        endpoint.refresh()
    return Router([pool], routing), pool


def route_chat(messages: list[dict], session: bytes | None, routing: cfg.Routing = cfg.Routing()) -> Call:
    r, _ = router(routing)
    decoded = protocol.decode_chat(orjson.dumps({"model": "m", "messages": messages}))
    call = Call("chat", b"/v1/chat/completions", b"id", 0.0)
    headers = {b"x-session-id": session} if session is not None else {}
    r.route(call, headers.get, decoded, "text", INTERACTIVE)
    return call


SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(("messages", "opening"), [
    ([USER], True),
    ([SYSTEM, USER], True),
    ([{"role": "developer", "content": "be brief"}, USER], True),
    ([SYSTEM, USER, ASSISTANT, USER], False),
    ([USER, USER], False),
])
def test_a_chat_with_one_message_besides_instructions_opens_its_session(messages, opening):
    # With one ring choice a later turn of a session this process never saw is presumed to live on
    # its ring owner; an opening turn is placed as new whatever the process remembers.
    call = route_chat(messages, b"conversation-1", cfg.Routing(ring_choices=1))
    assert call.keys.opening is opening
    assert call.branch == ("session_new" if opening else "session")


def test_a_request_without_a_session_key_is_never_marked_as_opening():
    assert route_chat([USER], None).keys.opening is False
