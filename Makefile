# Two commands on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
ENGINES := sglang==0.5.23 vllm==0.33.0

.PHONY: run test loadtest bench bench-streams bench-hedging profile clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -U pip
	$(PIP) -e .
	touch $@

# Test extras, Locust, and just enough of SGLang and vLLM for their own argument parsers to check our
# launch profiles (engine_nodes/requirements-parser.txt says why each package is there).
$(VENV)/.test: $(VENV)/.runtime engine_nodes/requirements-parser.txt
	$(PIP) -e '.[test,load]'
	$(PIP) -r engine_nodes/requirements-parser.txt
	$(PIP) --no-deps $(ENGINES)
	touch $@

run: $(VENV)/.runtime
	$(PY) -m engine_nodes.local_stack --config gateway/example.toml

# wrk drives the benchmark smoke test (tests/loadtests/test_bench_overhead.py).
test: $(VENV)/.test
	command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null)
	$(PY) -m pytest

# Two-minute headless Locust run against the `make run` stack (started and stopped around it);
# prints the KPI table, leaves Locust's CSV/HTML report in loadtest-results/<UTC time>/.
loadtest: $(VENV)/.test
	$(PY) -m loadtests.run --config gateway/example.toml

# Side-by-side overhead benchmark against vllm-router, sglang-router and nginx (about 15 minutes;
# installs wrk, nginx and the routers itself).
bench: $(VENV)/.runtime
	$(PY) -m loadtests.bench_overhead

# 10,000 concurrent open streams through the gateway (two workers), RSS per stream; about a minute.
bench-streams: $(VENV)/.runtime
	$(PY) -m loadtests.bench_streams

# TTFT when one of four replicas stalls, with and without hedging, beside sglang-router (~2 minutes).
bench-hedging: $(VENV)/.runtime
	$(PY) -m loadtests.bench_hedging

# Where the gateway's CPU goes under load: a py-spy profile folded by request-path stage (~30 s).
profile: $(VENV)/.runtime
	$(PIP) -e '.[profile]'
	command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null)
	$(PY) -m loadtests.profile_overhead

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
