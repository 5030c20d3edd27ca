"""``engine-node sim --explain``: the timing model's predictions next to published measurements.

For each profile it prints four predictions for the profile itself (TTFT and inter-token latency,
alone and in a loaded batch), then every published figure known for the same model. A published
figure is compared with the model *evaluated on the published setup* (its GPU count, precision,
speculation and workload), not on the profile, so the comparison checks the model and not the
difference between two setups. Where no measurement of the profile's exact configuration was
found, the output says so instead of inventing one.

Sources (every figure below is copied from them, nothing is derived except tokens/s -> ms/token):

- ``SGLANG_EAGLE3``: SGLang documentation, "Speculative Decoding", Performance Highlights table
  (from the EAGLE-3 paper, Li et al. 2025, arXiv:2503.01840): LLaMA-3.1-8B-Instruct, MT-bench,
  one H100, batch 1: 158.34 tokens/s without speculation, 373.25 tokens/s with EAGLE-3. The draft
  tree settings of that run are not stated there; the model uses the profile's EAGLE-3 settings.
- ``NIM_70B``: NVIDIA NIM LLM benchmarking guide, "Performance", Llama-3.3-70b-instruct results,
  NIM 1.8.0 on 2 x H100 80GB, FP8, TP2 (docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance).
  Llama-3.3-70B has the architecture of Llama-3.1-70B. NIM runs TensorRT-LLM or vLLM underneath.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine_nodes.profiles import Profile
from engine_nodes.sim.timing import TimingModel

SGLANG_EAGLE3 = "SGLang docs, Speculative Decoding (EAGLE-3 paper, arXiv:2503.01840), MT-bench"
NIM_70B = "NVIDIA NIM benchmarking guide, Llama-3.3-70B, NIM 1.8.0"

PREDICTION_PROMPT = 1024
LOADED_BATCH = 32
LOADED_OUTPUT = 256


@dataclass(frozen=True)
class Published:
    """One published latency, with the setup it was measured on."""

    model: str  # catalog model key it applies to
    setup: str  # how the setup reads in the output
    hardware: str
    quantization: str
    tp: int
    speculative: bool  # measured with EAGLE-3 (the profile's settings are used)
    metric: str  # "ttft" or "itl"
    concurrency: int
    prompt_tokens: int
    output_tokens: int
    value_ms: float
    source: str


PUBLISHED: tuple[Published, ...] = (
    Published("llama-3.1-8b", "1 x H100, BF16, SGLang, no speculation", "H100", "bf16", 1, False,
              "itl", 1, 256, 256, 1000 / 158.34, SGLANG_EAGLE3 + ": 158.34 tokens/s"),
    Published("llama-3.1-8b", "1 x H100, BF16, SGLang + EAGLE-3", "H100", "bf16", 1, True,
              "itl", 1, 256, 256, 1000 / 373.25, SGLANG_EAGLE3 + ": 373.25 tokens/s"),
    Published("llama-3.1-70b", "2 x H100, FP8, TP2, 5000 in / 500 out", "H100", "fp8", 2, False,
              "ttft", 1, 5000, 500, 406.77, NIM_70B),
    Published("llama-3.1-70b", "2 x H100, FP8, TP2, 5000 in / 500 out", "H100", "fp8", 2, False,
              "itl", 1, 5000, 500, 18.58, NIM_70B),
    Published("llama-3.1-70b", "2 x H100, FP8, TP2, 5000 in / 500 out", "H100", "fp8", 2, False,
              "ttft", 25, 5000, 500, 688.69, NIM_70B),
    Published("llama-3.1-70b", "2 x H100, FP8, TP2, 5000 in / 500 out", "H100", "fp8", 2, False,
              "itl", 25, 5000, 500, 38.75, NIM_70B),
    Published("llama-3.1-70b", "2 x H100, FP8, TP2, 500 in / 2000 out", "H100", "fp8", 2, False,
              "ttft", 1, 500, 2000, 47.77, NIM_70B),
    Published("llama-3.1-70b", "2 x H100, FP8, TP2, 500 in / 2000 out", "H100", "fp8", 2, False,
              "itl", 1, 500, 2000, 18.91, NIM_70B),
)


def predict(model: TimingModel, metric: str, concurrency: int, prompt: int, output: int) -> float:
    """Milliseconds, for ``concurrency`` requests of ``prompt`` in / ``output`` out in steady state."""
    if metric == "itl":
        return model.inter_token_seconds(concurrency, prompt, output) * 1e3
    others = concurrency - 1
    return model.ttft_seconds(prompt, running=others, running_context=prompt + output // 2) * 1e3


NOTE = (
    "Loaded TTFT here is one step that prefills the prompt beside the running batch; waiting behind\n"
    "other requests' prefills (why published loaded TTFTs are higher) is modelled by the running\n"
    "simulator's scheduler, not by this closed form."
)


def explain(selected: list[Profile]) -> str:
    return "\n\n".join([*(_explain_one(p) for p in selected), NOTE]) + "\n"


def _explain_one(profile: Profile) -> str:
    model = TimingModel(profile)
    spec = profile.speculative
    head = (f"{profile.name}: {profile.engine}, {profile.tp} x {profile.hardware}, {profile.model} "
            f"{profile.quantization.upper()}"
            + (f", EAGLE-3 ({spec.mean_accepted_tokens} tokens per verify)" if spec else ""))
    batch = min(LOADED_BATCH, profile.max_running_requests)
    rows = (
        (f"TTFT, {PREDICTION_PROMPT}-token prompt, alone", "ttft", 1),
        ("ITL, batch 1", "itl", 1),
        (f"TTFT, {PREDICTION_PROMPT}-token prompt, {batch - 1} others running", "ttft", batch),
        (f"ITL, {batch} concurrent ({PREDICTION_PROMPT} in / {LOADED_OUTPUT} out)", "itl", batch),
    )
    lines = [head, f"  KV pool: {model.kv_capacity_tokens():,} tokens", "  predicted for this profile:"]
    for label, metric, concurrency in rows:
        lines.append(f"    {label:<46}{predict(model, metric, concurrency, PREDICTION_PROMPT, LOADED_OUTPUT):9.2f} ms")
    references = [r for r in PUBLISHED if r.model == profile.model and (r.speculative <= (spec is not None))]
    exact = [r for r in references if (r.hardware, r.quantization, r.tp) ==
             (profile.hardware, profile.quantization, profile.tp) and r.speculative == (spec is not None)]
    if references:
        lines.append("  checked against published figures (model evaluated on the published setup):")
        for r in references:
            ref_profile = replace(profile, hardware=r.hardware, quantization=r.quantization, tp=r.tp,
                                  speculative=spec if r.speculative else None)
            predicted = predict(TimingModel(ref_profile), r.metric, r.concurrency, r.prompt_tokens, r.output_tokens)
            lines.append(
                f"    {r.metric.upper():4} concurrency {r.concurrency:<3} {r.setup}: predicted {predicted:8.2f} ms, "
                f"published {r.value_ms:8.2f} ms ({predicted / r.value_ms - 1:+.0%})  [{r.source}]"
            )
    if not exact:
        lines.append(f"  no published figure found for this exact configuration ({profile.tp} x {profile.hardware}, "
                     f"{profile.quantization.upper()}{', EAGLE-3' if spec else ''}); predictions above are unchecked")
    return "\n".join(lines)
