"""Parsing the engines' own metrics into load signals."""

from gateway.engine_signals import engine_signals

SGLANG = """# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",engine_type="unified"} 3.0
sglang:num_queue_reqs{model_name="m",engine_type="unified"} 2.0
sglang:token_usage{model_name="m",engine_type="unified"} 0.25
sglang:gen_throughput{model_name="m"} 120.0
"""
VLLM = """vllm:num_requests_running{model_name="m",engine="0"} 4.0
vllm:num_requests_running{model_name="m",engine="1"} 1.0
vllm:num_requests_waiting{model_name="m",engine="0"} 7.0
vllm:kv_cache_usage_perc{model_name="m",engine="0"} 0.5
vllm:kv_cache_usage_perc{model_name="m",engine="1"} 0.75
"""


def test_sglang_running_queued_and_kv_usage_are_read():
    assert engine_signals(SGLANG) == (3.0, 2.0, 0.25)


def test_vllm_label_sets_are_summed_and_kv_usage_is_the_worst_engine():
    assert engine_signals(VLLM) == (5.0, 7.0, 0.75)


def test_metrics_without_load_signals_count_as_missing():
    assert engine_signals("# nothing here\nprocess_cpu_seconds_total 1.0\n") is None
    assert engine_signals("sglang:num_running_reqs not-a-number\n") is None


def test_kv_usage_is_read_from_older_vllm_under_its_deprecated_name():
    older = VLLM.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert engine_signals(older) == (5.0, 7.0, 0.75)
