"""Scenario 20, API conformance: schemathesis generates requests from ``gateway/openapi.yaml`` against a
running gateway in front of a simulated SGLang pool and a simulated vLLM batch pool.

Promise: no response is a 5xx, and every 4xx body is OpenAI's error object (the spec declares
``4XX`` -> ``Error``, so schemathesis' ``response_schema_conformance`` checks each one, as it checks
2xx bodies and SSE events against their schemas). Both positive cases (valid per the spec) and
negative ones (breaking it) are sent, deterministically and at most 200 per operation and mode
(about 900 requests), so the file runs in well under a minute. Positive generation cases name the
served model (a random model name is only ever a 404) and ask for at most 8 tokens, so they reach
the engines and their own 4xx answers pass through the gateway too: SGLang's for interactive
requests, vLLM's for those that ask for the batch tier (``service_tier: flex`` or
``x-workload-class: batch``), each engine with its own error dialect.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.conftest import FAST_HEALTH, MODEL, ROOT, Simulator, pool_toml
from tests.integration.test_errors import assert_openai_error, post
from tests.security import shared_stack

OPENAPI = ROOT / "gateway" / "openapi.yaml"
EXAMPLES_PER_OPERATION = 200
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory):
    batch = Simulator("vllm", 1, 200.0, [])
    try:
        batch_pool = pool_toml("batch", "vllm", "batch", batch.urls)
        with shared_stack(tmp_path_factory.mktemp("api"), batch_pool) as (_, gw):
            yield gw.url
    finally:
        batch.stop()


# Loaded at import (schemathesis' fixture-based lazy loader sets Node._nodeid, which pytest 9 no longer
# has); the gateway's address is given to each call instead.
schema = schemathesis.openapi.from_path(OPENAPI)
schema.config.update(request_timeout=10)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=EXAMPLES_PER_OPERATION, deterministic=True)


def aim_at_an_engine(case) -> None:
    """For a valid generation request: the served model and a small completion budget."""
    body = case.body
    positive = case.meta.generation.mode is GenerationMode.POSITIVE
    if not positive or not isinstance(body, dict) or "model" not in body:
        return
    body["model"] = MODEL
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int):
            body[field] = min(body[field], MAX_TOKENS)
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS


@schema.parametrize()
def test_no_response_is_a_5xx_and_every_4xx_body_is_an_openai_error(case, gateway_url):
    """Scenario 20: schemathesis on every public operation: 0 responses >= 500, and every 4xx (and 2xx)
    body matches its schema in ``gateway/openapi.yaml``."""
    aim_at_an_engine(case)
    response = case.call(base_url=gateway_url)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                             content_type_conformance])


def test_vllm_error_passed_through_has_a_string_or_null_code(simulator, gateway):
    """Scenario 20: an engine's own 4xx (vLLM refusing an empty prompt) reaches the client in the Error
    shape the API promises: ``code`` a string or null, ``type`` from OpenAI's vocabulary."""
    sim = simulator("vllm")
    gw = gateway(FAST_HEALTH + pool_toml("batch", "vllm", "batch", sim.urls))
    empty_prompt = json.dumps({"model": MODEL, "prompt": ""}).encode()
    status, _, body = post(gw.port, empty_prompt, path=b"/v1/completions")
    assert status == 400
    error = assert_openai_error(body)
    assert error["code"] is None or isinstance(error["code"], str), error
    assert error["type"] == "invalid_request_error", error
