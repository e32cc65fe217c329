"""Every shipped recipe, shrunk, through its documented launcher: ``make test-recipes`` (in .venv-vllm).

These run in the environment GPU users install (the vLLM extra: vLLM 0.31 CPU build, TRL 1.16, transformers 5.17);
elsewhere this folder is not collected. Each test launches real processes (accelerate, vLLM engines, builders).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def vllm_installed() -> bool:
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


if not vllm_installed():
    collect_ignore_glob = ["test_*.py"]  # not the vLLM world: `make test-recipes` builds and uses .venv-vllm


def pytest_collection_modifyitems(config, items) -> None:
    """Every test here launches real processes (minutes in all): marked ``recipes`` and ``slow``."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.recipes)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smoke_work(tmp_path_factory) -> Path:
    """One folder for the session: the tiny models and the built datasets are shared by every recipe."""
    return tmp_path_factory.mktemp("recipe-smoke")
