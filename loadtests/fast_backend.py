"""A minimal OpenAI-compatible backend for proxy benchmarks: uvloop Protocols, httptools, canned bodies.

It must cost far less CPU per request than the proxies it measures (the simulator, on aiohttp, costs
more than the gateway itself), so it does nothing a real engine does: every answer is pre-rendered
at start-up. Non-streaming chat answers ``max_tokens``-independent 16 tokens; streaming answers 64
content events (role, 64 contents, finish, then ``[DONE]``), either all in one write (burst) or one
event every ``--token-ms`` milliseconds (paced). It serves ``/health``, ``/v1/models`` and
``/metrics`` (SGLang and vLLM names, all zero) so routers that probe them start cleanly.

    python -m loadtests.fast_backend --port 18001 --replicas 2 [--token-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket

import httptools
import orjson
import uvloop

EVENTS = 64


def _chat_chunk(delta: dict, finish: str | None) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}) + b"\n\n"


NON_STREAM = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * 16}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36,
              "prompt_tokens_details": {"cached_tokens": 0}}})
STREAM_EVENTS = ([_chat_chunk({"role": "assistant", "content": ""}, None)]
                 + [_chat_chunk({"content": " tok"}, None) for _ in range(EVENTS)]
                 + [_chat_chunk({}, "length"), b"data: [DONE]\n\n"])
JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
METRICS = (b"sglang:num_running_reqs 0\nsglang:num_queue_reqs 0\nsglang:token_usage 0\n"
           b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0\n")
MODELS = orjson.dumps({"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "bench"}]})
BURST = SSE_HEAD + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in STREAM_EVENTS) + b"0\r\n\r\n"


class Stats:
    accepted = 0
    requests = 0


class BackendProtocol(asyncio.Protocol):
    def __init__(self, token_s: float):
        self.token_s = token_s
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport):
        Stats.accepted += 1
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url):
        self.url = url

    def on_message_begin(self):
        self.body = []

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        Stats.requests += 1
        path = self.url
        if path.startswith(b"/v1/chat/completions") or path.startswith(b"/v1/completions"):
            body = b"".join(self.body)
            if b'"stream":true' in body.replace(b" ", b""):
                if self.token_s > 0:
                    asyncio.get_running_loop().create_task(self._paced())
                else:
                    self.transport.write(BURST)
            else:
                self.transport.write(JSON_HEAD % len(NON_STREAM) + NON_STREAM)
        elif path.startswith(b"/metrics"):
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n"
                                 % len(METRICS) + METRICS)
        elif path.startswith(b"/v1/models"):
            self.transport.write(JSON_HEAD % len(MODELS) + MODELS)
        elif path.startswith(b"/sim/stats"):
            doc = orjson.dumps({"accepted_connections": Stats.accepted, "requests": Stats.requests})
            self.transport.write(JSON_HEAD % len(doc) + doc)
        else:  # /health, /health_generate, /get_model_info, ...: a small JSON 200
            self.transport.write(JSON_HEAD % 2 + b"{}")

    async def _paced(self):
        t = self.transport
        t.write(SSE_HEAD)
        for event in STREAM_EVENTS:
            if t.is_closing():
                return
            t.write(b"%x\r\n%s\r\n" % (len(event), event))
            await asyncio.sleep(self.token_s)
        t.write(b"0\r\n\r\n")


async def serve(host: str, port: int, replicas: int, token_s: float) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda: BackendProtocol(token_s), host, port + i, backlog=4096)
               for i in range(replicas)]
    print("READY " + " ".join(str(port + i) for i in range(replicas)), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18001)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--token-ms", type=float, default=0.0, help="0: burst; else ms between stream events")
    a = p.parse_args()
    uvloop.run(serve(a.host, a.port, a.replicas, a.token_ms / 1000))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
