"""How long one engine step takes, from first principles.

An LLM engine advances in *steps*: one forward pass of the model over a batch that mixes prompt
tokens being prefilled (a chunk per request, within the chunked-prefill budget) and one new token
per decoding request (``num_draft_tokens`` per request when EAGLE-3 verifies a draft). A step runs
two kinds of kernels one after the other, plus the tensor-parallel communication and a fixed
launch overhead:

    t_step = t_linear + t_attention + t_allreduce + t_overhead   (+ t_draft with EAGLE-3)

**Linear layers** (the GEMMs) stream every weight once per step and do ``2 x active_params`` FLOPs
per token; they are bound by whichever is slower:

    t_linear = max(weight_bytes / (tp * HBM_bandwidth * HBM_EFFICIENCY),
                   2 * active_params * tokens / (tp * peak_FLOPS(dtype) * MFU))

``weight_bytes`` is parameters x bytes per parameter (BF16 2, FP8 1, FP4 0.5, see
``catalog.BYTES_PER_PARAM``). For a mixture-of-experts model only the experts that some token in
the batch routes to are read: with ``E`` experts of which ``k`` are active per token, a batch of
``B`` tokens touches an expected ``1 - (1 - k/E)^B`` of the expert weights (uniform routing), so a
small batch reads little more than the active parameters and a large one reads them all. At batch 1
decode is memory bound (t_linear = weight read time); a long prefill is compute bound.

**Attention** reads the KV cache of every decoding sequence (memory bound) and, for prefill
chunks, does ``4 x layers x hidden x context`` FLOPs per token (QK^T and AV over its context):

    t_attention = kv_tokens_read * kv_bytes_per_token / (tp * HBM_bandwidth * HBM_EFFICIENCY)
                  + attention_flops / (tp * peak_FLOPS(dtype) * MFU)

Summing the two kernel families rather than overlapping them is what makes a decode step slower
when prefill chunks ride along (chunked prefill's cost to inter-token latency).

**Tensor parallelism.** Each layer does two all-reduces (after attention and after the MLP) of
``tokens x hidden`` BF16 activations. A ring all-reduce moves ``2 (tp-1)/tp`` of the message per
GPU, plus a fixed latency per call:

    t_allreduce = 2 * layers * (ALLREDUCE_LATENCY + 2 (tp-1)/tp * tokens * hidden * 2 B / (NVLink * NVLINK_EFFICIENCY))

**EAGLE-3.** A draft head proposes ``num_draft_tokens`` tokens, and the target verifies them in one
step (so the verify step processes that many tokens per request). On average
``mean_accepted_tokens`` tokens are emitted per verify step; the draft passes cost
``draft_cost_fraction`` of a plain decode step of the same batch. Both figures live in the profile.

**Prefill.** Time to first token of a lone request is one step whose tokens are the uncached prompt
tokens (at batch 1 it is compute bound for any prompt longer than a few hundred tokens); cached
tokens cost nothing but the attention over their KV.

Constants and where they come from
----------------------------------
- Peak HBM bandwidth, dense FLOPS and NVLink bandwidth per GPU: ``catalog.HARDWARE`` (NVIDIA
  datasheets).
- ``HBM_EFFICIENCY = 0.80``: memory-bound decode kernels reach 75-85% of peak HBM bandwidth on
  Hopper. Calibrated against the EAGLE-3 paper's SGLang baseline (Li et al. 2025, "EAGLE-3",
  arXiv:2503.01840, Table 5: LLaMA-3.1-8B on one H100, batch 1, 158 tokens/s, i.e. 6.3 ms per
  token): 16.06 GB / (3.35 TB/s x 0.80) = 6.0 ms, plus the overhead below.
- ``MFU_PREFILL = 0.50``: large-batch prefill GEMMs reach about half of the dense peak in serving
  engines (assumption; consistent with the 35-60% MFU that serving papers report for prefill).
- ``STEP_OVERHEAD_S = 0.3 ms``: kernel launches under CUDA graphs, sampling and scheduler work per
  step (assumption; it closes the gap between the weight-read time and the 6.3 ms figure above).
- ``ALLREDUCE_LATENCY_S = 15 us``: one small-message all-reduce over NVLink (assumption, within
  the 5-25 us range of the engines' custom all-reduce kernels and NCCL; it brings the batch-1
  inter-token latency of Llama-70B FP8 on 2 x H100 within 15% of NVIDIA's NIM figure, see
  ``explain.py``).
- ``NVLINK_EFFICIENCY = 0.70``: achieved share of the NVLink datasheet bandwidth for large messages
  (assumption; NCCL bus bandwidth tests typically reach 70-80% on H100 NVLink).
- KV cache dtype: BF16 (2 bytes), the engines' default when no ``--kv-cache-dtype`` is given.

These are stated in one place (``Efficiency``) so that ``engine-node sim --explain`` can print the
predictions they give next to published measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine_nodes.catalog import BYTES_PER_PARAM, HARDWARE, MODELS, Hardware, Model
from engine_nodes.profiles import Profile

KV_DTYPE_BYTES = 2.0
ACTIVATION_BYTES = 2.0


@dataclass(frozen=True)
class Efficiency:
    hbm: float = 0.80
    mfu_prefill: float = 0.50
    nvlink: float = 0.70
    allreduce_latency_s: float = 15e-6
    step_overhead_s: float = 0.3e-3


@dataclass(frozen=True)
class StepShape:
    """What one engine step processes."""

    prefill_tokens: int = 0  # uncached prompt tokens computed this step
    prefill_context_tokens: int = 0  # sum over prefill chunks of (tokens x mean context they attend to)
    decode_requests: int = 0  # requests producing output this step
    decode_context_tokens: int = 0  # KV tokens those requests attend to (read from HBM)


class TimingModel:
    def __init__(self, profile: Profile, efficiency: Efficiency = Efficiency()) -> None:
        self.profile = profile
        self.eff = efficiency
        self.hw: Hardware = HARDWARE[profile.hardware]
        self.model: Model = MODELS[profile.model]
        self.weight_bytes = self.model.params_b * 1e9 * BYTES_PER_PARAM[profile.quantization]
        self.kv_bytes_per_token = self.model.kv_bytes_per_token(KV_DTYPE_BYTES)
        tflops = {"bf16": self.hw.bf16_tflops, "fp8": self.hw.fp8_tflops, "fp4": self.hw.fp4_tflops}
        peak = tflops[profile.quantization] or self.hw.fp8_tflops  # no FP4 cores: FP8 math
        self._flops_per_s = profile.tp * peak * 1e12 * efficiency.mfu_prefill
        self._bytes_per_s = profile.tp * self.hw.hbm_tb_s * 1e12 * efficiency.hbm
        spec = profile.speculative
        self.tokens_per_verify = spec.num_draft_tokens if spec else 1

    def kv_capacity_tokens(self) -> int:
        """KV pool size: GPU memory x TP x memory fraction, minus weights, per KV bytes per token."""
        usable = self.hw.hbm_gb * 1e9 * self.profile.tp * self.profile.mem_fraction - self.weight_bytes
        return max(0, int(usable / self.kv_bytes_per_token))

    def weight_bytes_read(self, tokens: int) -> float:
        """Weight bytes one step streams; for MoE, only the experts that ``tokens`` route to."""
        m = self.model
        if not m.experts:
            return self.weight_bytes
        share_active = m.active_experts / m.experts
        # params = dense + experts and active = dense + share_active * experts, solved for experts.
        expert_params = (m.params_b - m.active_params_b) / (1 - share_active)
        dense_params = m.params_b - expert_params
        touched = 1 - (1 - share_active) ** max(tokens, 1)
        return (dense_params + touched * expert_params) * 1e9 * BYTES_PER_PARAM[self.profile.quantization]

    def step_seconds(self, shape: StepShape) -> float:
        m = self.model
        decode_tokens = shape.decode_requests * self.tokens_per_verify
        tokens = shape.prefill_tokens + decode_tokens
        if tokens == 0:
            return 0.0
        t_linear = max(self.weight_bytes_read(tokens) / self._bytes_per_s,
                       2 * m.active_params_b * 1e9 * tokens / self._flops_per_s)
        attention_flops = 4 * m.layers * m.hidden * (
            shape.prefill_context_tokens + shape.decode_context_tokens * self.tokens_per_verify
        )
        kv_read = shape.decode_context_tokens + shape.prefill_context_tokens // max(shape.prefill_tokens, 1)
        t_attention = kv_read * self.kv_bytes_per_token / self._bytes_per_s + attention_flops / self._flops_per_s
        t = t_linear + t_attention + self._allreduce_seconds(tokens) + self.eff.step_overhead_s
        if self.profile.speculative and shape.decode_requests:
            t += self.profile.speculative.draft_cost_fraction * self._plain_decode_seconds(shape)
        return t

    def _plain_decode_seconds(self, shape: StepShape) -> float:
        """One non-speculative decode step of the same batch: the unit of the draft cost."""
        bytes_read = (self.weight_bytes_read(shape.decode_requests)
                      + shape.decode_context_tokens * self.kv_bytes_per_token)
        return bytes_read / self._bytes_per_s + self.eff.step_overhead_s

    def _allreduce_seconds(self, tokens: int) -> float:
        tp = self.profile.tp
        if tp == 1:
            return 0.0
        message = tokens * self.model.hidden * ACTIVATION_BYTES
        per_call = self.eff.allreduce_latency_s + 2 * (tp - 1) / tp * message / (
            self.hw.nvlink_gb_s * 1e9 * self.eff.nvlink
        )
        return 2 * self.model.layers * per_call

    # Predictions for --explain: a request alone, and one among a loaded batch.

    def ttft_seconds(self, prompt_tokens: int, cached_tokens: int = 0, running: int = 0,
                     running_context: int = 0) -> float:
        """The step that prefills a prompt (within one chunk) while ``running`` requests decode."""
        new = prompt_tokens - cached_tokens
        return self.step_seconds(StepShape(
            prefill_tokens=new,
            prefill_context_tokens=int(new * (cached_tokens + new / 2)),
            decode_requests=running,
            decode_context_tokens=running * running_context,
        ))

    def inter_token_seconds(self, batch: int, prompt_tokens: int, output_tokens: int) -> float:
        """Mean time between output tokens in a steady state of ``batch`` concurrent requests.

        Each request decodes ``output_tokens`` tokens after a ``prompt_tokens`` prefill, so in steady
        state every decode step also carries ``batch x prompt / output`` prefill tokens of the
        requests that replace finished ones (chunked prefill spreads them over the steps).
        """
        spec = self.profile.speculative
        per_step = spec.mean_accepted_tokens if spec else 1.0
        prefill = batch * prompt_tokens / (output_tokens / per_step) if batch > 1 else 0.0
        step = self.step_seconds(StepShape(
            prefill_tokens=int(prefill),
            prefill_context_tokens=int(prefill * prompt_tokens / 2),
            decode_requests=batch,
            decode_context_tokens=batch * (prompt_tokens + output_tokens // 2),
        ))
        return step / per_step
