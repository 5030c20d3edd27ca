"""The simulator speaks the engines' OpenAI HTTP surface, checked with the official client."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from tests.engine_nodes.conftest import SimProcess

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."}]


def client(sim: SimProcess, replica: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url("/v1", replica), api_key="unused", max_retries=0, timeout=10)


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def raw_post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.parametrize("flavor", ["sglang", "vllm"])
def test_stream_deltas_concatenate_to_the_non_stream_content(sim_factory, flavor):
    sim = sim_factory("--flavor", flavor, "--model", "m", "--speed", "500")
    c = client(sim)
    whole = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12)
    stream = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12, stream=True)
    chunks = list(stream)
    deltas = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert whole.choices[0].message.content == deltas
    assert whole.usage.completion_tokens == 12
    assert whole.choices[0].finish_reason == "length"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(chunks) == 12 + 2  # role chunk, one chunk per token, finish chunk


def test_same_seed_and_prompt_give_the_same_text_on_every_replica(sim_factory):
    sim = sim_factory("--flavor", "sglang", "--model", "m", "--speed", "500", "--seed", "3", replicas=2)
    texts = {client(sim, r).chat.completions.create(model="m", messages=MESSAGES, max_tokens=8)
             .choices[0].message.content for r in (0, 1)}
    assert len(texts) == 1
    (text,) = texts
    words = text.split(" ")
    assert words[0] == "" and len(words) == 9  # each token is one word with a leading space


def test_include_usage_adds_a_final_usage_chunk_with_cached_tokens(sglang_sim):
    stream = client(sglang_sim).chat.completions.create(
        model="sim-model", messages=MESSAGES, max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 5
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens == 0
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stream_wire_format_is_sse_events_ending_with_done(vllm_sim):
    status, headers, body = raw_post(vllm_sim.url("/v1/chat/completions"), {
        "model": "sim-model", "messages": MESSAGES, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    events = body.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in payloads[1]  # vLLM serialises chunks with exclude_unset
    assert payloads[-2]["choices"][0]["delta"] == {}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["total_tokens"] == payloads[-1]["usage"][
        "prompt_tokens"] + 3


def test_completions_stream_and_non_stream_agree(sglang_sim):
    c = client(sglang_sim)
    whole = c.completions.create(model="sim-model", prompt="Once upon a time", max_tokens=6)
    assert whole.object == "text_completion"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="sim-model", prompt="Once upon a time", max_tokens=6, stream=True) if ch.choices)
    assert streamed == whole.choices[0].text
    assert whole.usage.prompt_tokens == 4  # 16 bytes at 4 bytes per token


@pytest.mark.parametrize("flavor", ["sglang", "vllm"])
def test_a_batch_of_prompts_with_n_samples_gets_one_choice_per_prompt_and_sample(sim_factory, flavor):
    # vLLM batch clients send several prompts and n > 1 at once: choice i is prompt i // n, sample i % n.
    sim = sim_factory("--flavor", flavor, "--model", "m", "--speed", "500")
    c = client(sim)
    prompts = ["Once upon a time", "It was a dark and stormy night"]
    whole = c.completions.create(model="m", prompt=prompts, n=2, max_tokens=6)
    assert [choice.index for choice in whole.choices] == [0, 1, 2, 3]
    texts = [choice.text for choice in whole.choices]
    assert len(set(texts)) == 4  # each sample of a prompt writes its own text
    alone = [c.completions.create(model="m", prompt=p, max_tokens=6).choices[0].text for p in prompts]
    assert texts[0::2] == alone  # sample 0 of each prompt is what the prompt alone gets
    assert whole.usage.prompt_tokens == 4 + 8  # each prompt counted once, not once per sample
    assert whole.usage.completion_tokens == 4 * 6

    streamed = ["", "", "", ""]
    finished = []
    usage = None
    for chunk in c.completions.create(model="m", prompt=prompts, n=2, max_tokens=6, stream=True,
                                      stream_options={"include_usage": True}):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            if choice.finish_reason:
                finished.append(choice.index)
        usage = chunk.usage or usage
    assert streamed == texts
    assert sorted(finished) == [0, 1, 2, 3]
    assert (usage.prompt_tokens, usage.completion_tokens) == (12, 24)


def test_chat_with_n_samples_streams_a_role_and_a_finish_per_choice(vllm_sim):
    c = client(vllm_sim)
    whole = c.chat.completions.create(model="sim-model", messages=MESSAGES, n=3, max_tokens=4)
    assert [choice.index for choice in whole.choices] == [0, 1, 2]
    chunks = list(c.chat.completions.create(model="sim-model", messages=MESSAGES, n=3, max_tokens=4,
                                            stream=True))
    roles = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2]
    content = ["", "", ""]
    for ch in chunks:
        for choice in ch.choices:
            content[choice.index] += choice.delta.content or ""
    assert content == [choice.message.content for choice in whole.choices]


def test_echo_returns_the_prompt_before_the_text_and_alone_with_max_tokens_0(vllm_sim):
    # Scoring harnesses send echo with max_tokens 0: the prompt back, no text generated.
    c = client(vllm_sim)
    prompt = "The capital of France is"
    plain = c.completions.create(model="sim-model", prompt=prompt, max_tokens=3).choices[0].text
    assert c.completions.create(model="sim-model", prompt=prompt, max_tokens=3, echo=True).choices[0].text \
        == prompt + plain
    alone = c.completions.create(model="sim-model", prompt=prompt, max_tokens=0, echo=True)
    assert alone.choices[0].text == prompt
    assert alone.usage.completion_tokens == 1  # vLLM generates one token and drops it, and counts it
    streamed = [ch.choices[0].text for ch in c.completions.create(
        model="sim-model", prompt=prompt, max_tokens=3, echo=True, stream=True) if ch.choices]
    assert "".join(streamed) == prompt + plain and streamed[0].startswith(prompt)
    assert "".join(ch.choices[0].text for ch in c.completions.create(
        model="sim-model", prompt=prompt, max_tokens=0, echo=True, stream=True) if ch.choices) == prompt


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "n": 0}, "n must be a positive integer"),
    ({"prompt": "x", "n": True}, "n must be a positive integer"),
    ({"prompt": ["x"] * 65, "n": 2}, "n x prompts must be at most 128"),
    ({"prompt": ["x", 3]}, "prompt must be"),
    ({"prompt": []}, "prompt must be"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens must be a positive integer"),
])
def test_unservable_choice_counts_and_prompts_get_a_400(vllm_sim, body, message):
    status, _, answer = raw_post(vllm_sim.url("/v1/completions"), {"model": "sim-model", **body})
    assert status == 400
    assert json.loads(answer)["error"]["message"].startswith(message)


def test_unknown_model_gets_the_engines_404_error(sglang_sim, vllm_sim):
    with pytest.raises(openai.NotFoundError) as sglang_error:
        client(sglang_sim).chat.completions.create(model="other", messages=MESSAGES)
    assert sglang_error.value.body["message"] == "The model `other` does not exist."
    status, _, body = raw_post(vllm_sim.url("/v1/chat/completions"), {"model": "other", "messages": MESSAGES})
    assert status == 404
    assert json.loads(body)["error"]["type"] == "NotFoundError"


def test_request_id_is_echoed_and_logged_with_the_raw_body(sglang_sim):
    body = {"model": "sim-model", "messages": MESSAGES, "max_tokens": 2}
    status, headers, _ = raw_post(sglang_sim.url("/v1/chat/completions"), body, {"X-Request-Id": "rid-42"})
    assert status == 200 and headers["x-request-id"] == "rid-42"
    (record,) = get_json(sglang_sim.url("/sim/requests?limit=1"))
    assert record["id"] == "rid-42"
    assert record["headers"]["x-request-id"] == "rid-42"
    assert json.loads(record["body"]) == body
    assert record["finished"] and not record["cancelled"] and record["status"] == 200
    assert record["chunks_sent"] == 1 and record["stream"] is False


def test_models_and_health_endpoints(sglang_sim, vllm_sim):
    for sim in (sglang_sim, vllm_sim):
        models = client(sim).models.list()
        assert [m.id for m in models.data] == ["sim-model"]
        with urllib.request.urlopen(sim.url("/health"), timeout=5) as response:
            assert response.status == 200
    info = get_json(sglang_sim.url("/get_server_info"))
    assert info["speculative_algorithm"] == "EAGLE3" and info["max_total_num_tokens"] > 100_000
    assert get_json(sglang_sim.url("/get_model_info"))["is_generation"] is True
    with urllib.request.urlopen(sglang_sim.url("/health_generate"), timeout=5) as response:
        assert response.status == 200


def test_stats_count_requests_and_tcp_accepts_and_reset_clears_them(sglang_sim):
    c = client(sglang_sim)  # one pooled keep-alive connection
    for _ in range(3):
        c.chat.completions.create(model="sim-model", messages=MESSAGES, max_tokens=2)
    stats = get_json(sglang_sim.url("/sim/stats"))
    assert stats["requests"] == 3 and stats["active"] == 0
    assert stats["accepted_connections"] == 2  # the client's pooled connection and this probe's
    raw_post(sglang_sim.url("/sim/reset"), {})
    assert get_json(sglang_sim.url("/sim/requests")) == []
    assert get_json(sglang_sim.url("/sim/stats"))["requests"] == 0


def test_sigterm_exits_cleanly_even_with_a_stream_in_flight(sim_factory):
    sim = sim_factory("--flavor", "sglang", "--model", "m", "--hang-after-chunks", "1")
    request = urllib.request.Request(sim.url("/v1/chat/completions"), method="POST", data=json.dumps(
        {"model": "m", "messages": MESSAGES, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.readline().startswith(b"data: ")  # the stream is now hung after one chunk
        assert sim.stop() == 0
