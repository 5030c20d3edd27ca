"""Declarative launch profiles for real engine replicas.

A profile says which engine runs which model on which GPUs, and how. The same record drives two
things: ``engine-node launch`` turns it into the real ``python -m sglang.launch_server`` or
``vllm serve`` command line (``engine_nodes.launch``), and ``engine-node sim --profile`` feeds its
hardware, model, quantisation, tensor parallelism and speculative settings to the simulator's
timing model.

Two kinds of profile, for the gateway's two pool roles:

- **interactive** (SGLang): FP8 weights on Hopper, FP4 on Blackwell, EAGLE-3 speculative decoding,
  and more tensor parallelism than memory needs. Decode reads every weight once per step, so the
  per-token latency floor is ``weight bytes / (tp x HBM bandwidth)``: extra GPUs buy latency.
- **batch** (vLLM): the least tensor parallelism that fits, chunked prefill with a large token
  budget, async scheduling, many sequences in flight, prefix caching. Throughput per GPU is the
  goal, and every GPU added to one replica is a GPU not running another replica.

"Fits" is decided the way vLLM decides whether it can start at all (``_check_enough_kv_cache_memory``
in ``vllm/v1/core/kv_cache_planning.py``): after the weights, the KV pool must hold at least one
request at the model's full context length. :meth:`Profile.least_tp_that_fits` applies that rule to
the catalog's figures (weights at the profile's quantisation, BF16 KV cache, the profile's memory
fraction of HBM); activations, CUDA graphs and the EAGLE draft head are left out, which is why the
memory fractions below are well under 1. Cost: a few multiplications per candidate TP.

The reasoning and sources for each value are in ``engine_nodes/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine_nodes.catalog import BYTES_PER_PARAM, HARDWARE, MODELS

# Tensor-parallel sizes a replica may use: powers of two that divide the catalog models' KV heads.
TP_SIZES = (1, 2, 4, 8)
# KV cache bytes per element: both engines keep BF16 KV unless told otherwise, and no profile does.
KV_DTYPE_BYTES = 2.0

# Engine quantisation method per (engine, precision of the weights). "fp8" is online quantisation
# of the BF16 checkpoint (SGLang and vLLM both accept it); the FP4 checkpoint is an NVFP4 export in
# the compressed-tensors format, which SGLang loads with its compressed-tensors W4A4 NVFP4 scheme.
QUANTIZATION_METHOD: dict[tuple[str, str], str | None] = {
    ("sglang", "bf16"): None,
    ("sglang", "fp8"): "fp8",
    ("sglang", "fp4"): "compressed-tensors",
    ("vllm", "bf16"): None,
    ("vllm", "fp8"): "fp8",
}


@dataclass(frozen=True)
class Speculative:
    """EAGLE-3 speculative decoding: a small draft head proposes tokens, the target verifies them."""

    algorithm: str  # "EAGLE3"
    draft_model: str  # HF path of the EAGLE-3 draft head trained for the target model
    num_steps: int  # draft autoregressive steps per verify
    eagle_topk: int  # branching of the draft tree per step (1: a chain)
    num_draft_tokens: int  # tokens sent to the target for verification per step
    mean_accepted_tokens: float  # simulator: mean tokens emitted per target verify step
    draft_cost_fraction: float  # simulator: draft cost per verify step, as a share of one target decode step
    # None: the draft inherits the target's quantisation (SGLang's default); "unquant" keeps it BF16,
    # needed when the target's method describes a pre-quantised checkpoint the draft is not.
    draft_quantization: str | None = None


@dataclass(frozen=True)
class Profile:
    name: str
    engine: Literal["sglang", "vllm"]
    role: Literal["interactive", "batch"]
    hardware: str  # key of engine_nodes.catalog.HARDWARE
    model: str  # key of engine_nodes.catalog.MODELS; also the served model name the gateway's pools list
    quantization: Literal["bf16", "fp8", "fp4"]  # precision of the weights
    tp: int
    # Share of GPU memory for weights + KV (SGLang --mem-fraction-static, vLLM --gpu-memory-utilization).
    mem_fraction: float
    page_size: int  # KV page size in tokens
    chunked_prefill_tokens: int  # prefill token budget per scheduler step
    max_running_requests: int
    speculative: Speculative | None = None
    extra_args: tuple[str, ...] = ()
    # Weights to load when they are a pre-quantised export rather than the catalog's checkpoint.
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.hardware not in HARDWARE:
            raise ValueError(f"{self.name}: unknown hardware {self.hardware!r}")
        if self.model not in MODELS:
            raise ValueError(f"{self.name}: unknown model {self.model!r}")
        if (self.engine, self.quantization) not in QUANTIZATION_METHOD:
            raise ValueError(f"{self.name}: {self.engine} profiles have no {self.quantization} method here")
        if self.quantization == "fp4" and not HARDWARE[self.hardware].fp4_tflops:
            raise ValueError(f"{self.name}: {self.hardware} has no FP4 tensor cores")
        if self.quantization == "fp4" and self.checkpoint is None:
            # FP4 needs calibrated scales: neither engine quantises a dense BF16 model to FP4 at load.
            raise ValueError(f"{self.name}: FP4 needs a pre-quantised checkpoint")
        if self.tp not in TP_SIZES:
            raise ValueError(f"{self.name}: tp must be one of {TP_SIZES}")
        if not 0 < self.mem_fraction < 1:
            raise ValueError(f"{self.name}: mem_fraction must be in (0, 1)")
        if self.speculative is not None and self.engine != "sglang":
            raise ValueError(f"{self.name}: speculative decoding is only configured for SGLang profiles")

    @property
    def weights_path(self) -> str:
        """What the engine loads: the pre-quantised export, else the catalog's checkpoint."""
        return self.checkpoint or MODELS[self.model].hf_path

    @property
    def quantization_method(self) -> str | None:
        """The engine's ``--quantization`` value, None for BF16 weights."""
        return QUANTIZATION_METHOD[(self.engine, self.quantization)]

    def weights_gb(self) -> float:
        """Weights of the whole model at this profile's precision, in GB (1e9 bytes)."""
        return MODELS[self.model].params_b * BYTES_PER_PARAM[self.quantization]

    def kv_pool_gb(self, tp: int) -> float:
        """Memory left for the KV cache across ``tp`` GPUs once the weights are loaded, in GB."""
        return HARDWARE[self.hardware].hbm_gb * self.mem_fraction * tp - self.weights_gb()

    def full_context_kv_gb(self) -> float:
        """KV cache of one request at the model's maximum context length, in GB."""
        model = MODELS[self.model]
        return model.max_context * model.kv_bytes_per_token(KV_DTYPE_BYTES) / 1e9

    def least_tp_that_fits(self) -> int:
        """Smallest TP whose KV pool holds one full-context request (vLLM's start-up condition)."""
        for tp in TP_SIZES:
            if self.kv_pool_gb(tp) >= self.full_context_kv_gb():
                return tp
        raise ValueError(f"{self.name}: does not fit on {TP_SIZES[-1]} x {self.hardware}")


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="sglang-h100-llama8b-fp8-eagle3",
            engine="sglang", role="interactive", hardware="H100", model="llama-3.1-8b",
            quantization="fp8", tp=2, mem_fraction=0.80, page_size=16,
            chunked_prefill_tokens=8192, max_running_requests=64,
            # Accepted-token estimate: 2.77 is measured with a 7-token chain at temperature 1
            # (nebius/EAGLE3-Llama-3.3-70B-Instruct model card, MT-bench); a 3-token chain keeps
            # most of it, since the tail positions are the least likely to be accepted.
            speculative=Speculative("EAGLE3", "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", 3, 1, 4, 2.6, 0.15),
        ),
        Profile(
            name="sglang-h200-llama70b-fp8-eagle3",
            engine="sglang", role="interactive", hardware="H200", model="llama-3.1-70b",
            quantization="fp8", tp=4, mem_fraction=0.80, page_size=16,
            chunked_prefill_tokens=8192, max_running_requests=64,
            # The public EAGLE-3 heads for 70B Llama were trained on Llama-3.3-70B-Instruct (same
            # architecture and tokenizer as 3.1); acceptance on 3.1 is unmeasured, hence the margin
            # under the 2.88 measured for a 3.3 head with a 7-token chain (same model card as above).
            speculative=Speculative("EAGLE3", "yuhuili/EAGLE3-LLaMA3.3-Instruct-70B", 3, 1, 4, 2.4, 0.10),
        ),
        Profile(
            name="sglang-b200-llama70b-fp4-eagle3",
            engine="sglang", role="interactive", hardware="B200", model="llama-3.1-70b",
            quantization="fp4", tp=2, mem_fraction=0.80, page_size=16,
            chunked_prefill_tokens=8192, max_running_requests=64,
            checkpoint="RedHatAI/Llama-3.1-70B-Instruct-NVFP4",
            speculative=Speculative("EAGLE3", "yuhuili/EAGLE3-LLaMA3.3-Instruct-70B", 3, 1, 4, 2.4, 0.10,
                                    draft_quantization="unquant"),
        ),
        Profile(
            name="sglang-h100-qwen3moe-fp8-eagle3",
            engine="sglang", role="interactive", hardware="H100", model="qwen3-30b-a3b",
            quantization="fp8", tp=2, mem_fraction=0.80, page_size=16,
            chunked_prefill_tokens=8192, max_running_requests=64,
            # No published acceptance figure for this head at a 3-token chain: same estimate as 70B.
            speculative=Speculative("EAGLE3", "Tengyunw/qwen3_30b_moe_eagle3", 3, 1, 4, 2.4, 0.15),
        ),
        Profile(
            name="vllm-h100-llama8b-batch",
            engine="vllm", role="batch", hardware="H100", model="llama-3.1-8b",
            quantization="bf16", tp=1, mem_fraction=0.92, page_size=16,
            chunked_prefill_tokens=16384, max_running_requests=1024,
        ),
        Profile(
            name="vllm-h100-llama70b-batch",
            engine="vllm", role="batch", hardware="H100", model="llama-3.1-70b",
            quantization="fp8", tp=2, mem_fraction=0.92, page_size=16,
            chunked_prefill_tokens=16384, max_running_requests=1024,
        ),
    )
}

DEFAULT_PROFILE = {"sglang": "sglang-h100-llama8b-fp8-eagle3", "vllm": "vllm-h100-llama8b-batch"}


def get(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
