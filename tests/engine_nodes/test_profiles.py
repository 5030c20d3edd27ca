"""Launch profiles: the engines' own parsers accept them, and their TP choices follow the stated rules.

SGLang's and vLLM's argument parsers are imported for real (CI installs them from
``engine_nodes/requirements-parser.txt`` without their GPU dependencies); if either import fails,
these tests fail rather than skip.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import replace

import pytest

from engine_nodes import launch, profiles
from engine_nodes.catalog import HARDWARE, MODELS
from engine_nodes.profiles import PROFILES, Profile, Speculative

SGLANG_PROFILES = [p for p in PROFILES.values() if p.engine == "sglang"]
VLLM_PROFILES = [p for p in PROFILES.values() if p.engine == "vllm"]
HOST, PORT = "10.1.2.3", 31234  # arbitrary non-default values, to see them arrive


@pytest.fixture(scope="module")
def sglang_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


@pytest.fixture(scope="module")
def vllm_parser() -> Iterator[argparse.ArgumentParser]:
    # Without a GPU, vLLM's platform detection finds no device and the DeviceConfig default that
    # add_cli_args builds refuses to construct; the CPU platform is what vLLM picks when told so.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_TARGET_DEVICE", "cpu")
        from vllm.entrypoints.common.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        yield make_arg_parser(FlexibleArgumentParser())


@pytest.mark.parametrize("profile", SGLANG_PROFILES, ids=lambda p: p.name)
def test_sglang_server_args_accepts_every_sglang_profile_with_its_values(
        sglang_parser: argparse.ArgumentParser, profile: Profile) -> None:
    from sglang.srt.server_args import ServerArgs

    namespace = sglang_parser.parse_args(launch.server_args(profile, HOST, PORT))
    # from_cli_args builds the record without resolving it: in sglang 0.5.23 resolution
    # (ServerArgs.resolve_once) needs transformers and the model's config.json from the hub.
    args = ServerArgs.from_cli_args(namespace)
    spec = profile.speculative
    assert spec is not None
    assert (args.model_path, args.served_model_name) == (profile.weights_path, profile.model)
    assert (args.host, args.port) == (HOST, PORT)
    assert args.quantization == profile.quantization_method
    assert args.tp_size == profile.tp
    assert args.mem_fraction_static == profile.mem_fraction
    assert args.page_size == profile.page_size
    assert args.chunked_prefill_size == profile.chunked_prefill_tokens
    assert args.max_running_requests == profile.max_running_requests
    assert args.speculative_algorithm == spec.algorithm == "EAGLE3"
    assert args.speculative_draft_model_path == spec.draft_model
    assert args.speculative_num_steps == spec.num_steps
    assert args.speculative_eagle_topk == spec.eagle_topk
    assert args.speculative_num_draft_tokens == spec.num_draft_tokens
    assert args.speculative_draft_model_quantization == spec.draft_quantization
    assert args.enable_metrics and args.enable_cache_report and args.stream_response_default_include_usage


@pytest.mark.parametrize("profile", VLLM_PROFILES, ids=lambda p: p.name)
def test_vllm_serve_parser_accepts_every_vllm_profile_with_its_values(
        vllm_parser: argparse.ArgumentParser, profile: Profile) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.common.cli_args import validate_parsed_serve_args

    namespace = vllm_parser.parse_args(launch.server_args(profile, HOST, PORT))
    validate_parsed_serve_args(namespace)
    assert namespace.model_tag == profile.weights_path
    assert (namespace.host, namespace.port) == (HOST, PORT)
    assert namespace.enable_force_include_usage and namespace.enable_prompt_tokens_details
    namespace.model = namespace.model_tag  # what `vllm serve` does before building the engine args
    args = AsyncEngineArgs.from_cli_args(namespace)
    assert args.model == profile.weights_path
    assert args.served_model_name == [profile.model]
    assert args.quantization == profile.quantization_method
    assert args.tensor_parallel_size == profile.tp
    assert args.gpu_memory_utilization == profile.mem_fraction
    assert args.block_size == profile.page_size
    assert args.max_num_batched_tokens == profile.chunked_prefill_tokens
    assert args.max_num_seqs == profile.max_running_requests
    assert args.enable_chunked_prefill is True
    assert args.async_scheduling is True
    assert args.enable_prefix_caching is True


@pytest.mark.parametrize("profile", [p for p in PROFILES.values() if p.role == "interactive"],
                         ids=lambda p: p.name)
def test_interactive_profiles_use_more_tp_than_memory_needs(profile: Profile) -> None:
    assert profile.tp > profile.least_tp_that_fits()


@pytest.mark.parametrize("profile", [p for p in PROFILES.values() if p.role == "batch"], ids=lambda p: p.name)
def test_batch_profiles_use_the_least_tp_that_fits(profile: Profile) -> None:
    assert profile.tp == profile.least_tp_that_fits()


def test_least_tp_that_fits_leaves_room_for_one_full_context_request() -> None:
    batch_70b = profiles.get("vllm-h100-llama70b-batch")
    llama70b, h100 = MODELS["llama-3.1-70b"], HARDWARE["H100"]
    full_context_gb = llama70b.max_context * llama70b.kv_bytes_per_token(2.0) / 1e9
    assert batch_70b.full_context_kv_gb() == pytest.approx(full_context_gb)
    # FP8 weights (70.6 GB) fit one H100's 0.92 x 80 GB, but leave 3 GB of KV: less than one request.
    budget = h100.hbm_gb * batch_70b.mem_fraction
    assert batch_70b.weights_gb() < budget < batch_70b.weights_gb() + full_context_gb
    assert batch_70b.least_tp_that_fits() == 2
    # In BF16 the weights double, and two GPUs no longer leave room for that request either.
    assert replace(batch_70b, quantization="bf16").least_tp_that_fits() == 4


def test_profile_that_fits_on_no_tp_size_is_reported() -> None:
    tiny_budget = replace(profiles.get("vllm-h100-llama8b-batch"), mem_fraction=0.01)
    with pytest.raises(ValueError, match="does not fit"):
        tiny_budget.least_tp_that_fits()


def test_interactive_tier_is_sglang_with_eagle3_fp8_on_hopper_and_fp4_on_blackwell() -> None:
    for p in PROFILES.values():
        if p.role != "interactive":
            continue
        assert p.engine == "sglang" and p.speculative is not None and p.speculative.algorithm == "EAGLE3"
        assert p.quantization == ("fp4" if p.hardware == "B200" else "fp8"), p.name


def test_batch_tier_is_vllm_without_speculation() -> None:
    batch = [p for p in PROFILES.values() if p.role == "batch"]
    assert batch and all(p.engine == "vllm" and p.speculative is None for p in batch)


def test_profiles_cover_the_issue_matrix() -> None:
    have = {(p.engine, p.hardware, p.model, p.quantization) for p in PROFILES.values()}
    assert {
        ("sglang", "H100", "llama-3.1-8b", "fp8"),
        ("sglang", "H200", "llama-3.1-70b", "fp8"),
        ("sglang", "B200", "llama-3.1-70b", "fp4"),
        ("sglang", "H100", "qwen3-30b-a3b", "fp8"),
    } <= have
    assert {("llama-3.1-8b", "H100"), ("llama-3.1-70b", "H100")} <= {
        (p.model, p.hardware) for p in PROFILES.values() if p.engine == "vllm"
    }


def test_default_profiles_name_existing_profiles_of_their_engine() -> None:
    for engine, name in profiles.DEFAULT_PROFILE.items():
        assert profiles.get(name).engine == engine


def test_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="sglang-h100-llama8b-fp8-eagle3"):
        profiles.get("no-such-profile")


def test_fp4_profile_on_a_gpu_without_fp4_tensor_cores_is_rejected() -> None:
    with pytest.raises(ValueError, match="no FP4 tensor cores"):
        replace(profiles.get("sglang-b200-llama70b-fp4-eagle3"), hardware="H200")


def test_fp4_profile_without_a_prequantized_checkpoint_is_rejected() -> None:
    with pytest.raises(ValueError, match="pre-quantised checkpoint"):
        replace(profiles.get("sglang-b200-llama70b-fp4-eagle3"), checkpoint=None)


def test_speculative_decoding_on_a_vllm_profile_is_rejected() -> None:
    draft = Speculative("EAGLE3", "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", 3, 1, 4, 2.6, 0.15)
    with pytest.raises(ValueError, match="only configured for SGLang"):
        replace(profiles.get("vllm-h100-llama8b-batch"), speculative=draft)


def test_prequantized_checkpoint_is_what_the_engine_loads() -> None:
    fp4 = profiles.get("sglang-b200-llama70b-fp4-eagle3")
    assert fp4.checkpoint and fp4.weights_path == fp4.checkpoint
    fp8 = profiles.get("sglang-h200-llama70b-fp8-eagle3")
    assert fp8.checkpoint is None and fp8.weights_path == MODELS[fp8.model].hf_path
