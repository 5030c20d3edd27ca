"""Hardware and model tables shared by the launch profiles and the simulator's timing model.

Every figure names its source so that a reviewer can check it. Datasheet figures are peak
numbers; efficiency factors that turn them into achieved numbers live in ``sim/timing.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    """One GPU model. Throughput figures are dense (no 2:4 sparsity), per GPU."""

    name: str
    hbm_gb: float
    hbm_tb_s: float
    bf16_tflops: float
    fp8_tflops: float
    fp4_tflops: float  # 0 where the GPU has no FP4 tensor cores
    nvlink_gb_s: float  # per-GPU bidirectional NVLink bandwidth
    source: str


@dataclass(frozen=True)
class Model:
    """One served model. ``active_params_b`` differs from ``params_b`` only for MoE models."""

    key: str
    hf_path: str
    params_b: float
    active_params_b: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    max_context: int
    source: str
    experts: int = 0  # routed experts per MoE layer; 0 for dense models
    active_experts: int = 0  # experts each token is routed to

    def kv_bytes_per_token(self, kv_dtype_bytes: float = 2.0) -> float:
        """K and V for every layer: 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_dtype_bytes


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("H100", 80, 3.35, 989, 1979, 0, 900, "NVIDIA H100 SXM5 datasheet (dense TFLOPS)"),
        Hardware("H200", 141, 4.8, 989, 1979, 0, 900, "NVIDIA H200 SXM datasheet (dense TFLOPS)"),
        Hardware("B200", 180, 8.0, 2250, 4500, 9000, 1800, "NVIDIA DGX B200 / HGX B200 datasheet (dense)"),
    )
}

MODELS: dict[str, Model] = {
    m.key: m
    for m in (
        Model(
            "llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", 8.03, 8.03, 32, 4096, 8, 128, 131072,
            "config.json of meta-llama/Llama-3.1-8B-Instruct",
        ),
        Model(
            "llama-3.1-70b", "meta-llama/Llama-3.1-70B-Instruct", 70.6, 70.6, 80, 8192, 8, 128, 131072,
            "config.json of meta-llama/Llama-3.1-70B-Instruct",
        ),
        Model(
            "qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", 30.5, 3.3, 48, 2048, 4, 128, 40960,
            "Qwen3 technical report and config.json of Qwen/Qwen3-30B-A3B (MoE, 128 experts, 8 active)",
            experts=128, active_experts=8,
        ),
    )
}

BYTES_PER_PARAM: dict[str, float] = {"bf16": 2.0, "fp8": 1.0, "fp4": 0.5}
