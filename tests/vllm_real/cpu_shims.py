"""What TRL 1.16's colocate path needs on vLLM 0.31's CPU backend (test-side shims; the fixes belong in src/).

Two shims make TRL 1.16's colocate path run on vLLM's CPU backend; both live here, not in src/:

* Sleep mode: vLLM refuses ``enable_sleep_mode`` on CPU at config time ("Sleep mode is not supported on current
  platform") and its CPU worker ignores ``sleep``/``wake_up`` (a logged warning). :func:`allow_cpu_sleep_mode` lets
  the config through, so TRL's sleep-mode bookkeeping (a level-2 sleep marks the weights discarded, and the next
  generation re-syncs them) runs for real; no memory is freed on CPU.
* Weight sync: the CPU backend packs every linear layer's weight into a oneDNN / sgl-kernel handle after loading and
  leaves an empty ``Parameter`` without a ``weight_loader``, so TRL's per-tensor ``model.load_weights`` fails
  (``AttributeError: 'Parameter' object has no attribute 'weight_loader'``). :func:`cpu_weight_sync` wraps TRL's
  ``sync_weights`` in vLLM's layer-wise reload (``initialize_layerwise_reload`` / ``finalize_layerwise_reload``:
  the checkpoint-format parameters are restored, loaded and re-packed), then re-packs a tied LM head, whose packed
  copy of the embedding would otherwise stay the initial one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def allow_cpu_sleep_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``enable_sleep_mode=True`` through vLLM's config check on CPU (its CPU worker then ignores sleep/wake)."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_sleep_mode_available", lambda self: True)


def relink_tied_head(model) -> bool:
    """Re-pack a tied LM head from the (just reloaded) embedding; True when the model has one."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def reload_in_place(llm, load) -> None:
    """Run ``load()`` (calls of the vLLM model's ``load_weights``) inside vLLM's layer-wise reload on a CPU engine."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    worker = llm.llm_engine.model_executor.driver_worker.worker
    model = worker.model_runner.get_model()
    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(model)
        load()
        finalize_layerwise_reload(model, worker.model_config)
        relink_tied_head(model)


def cpu_weight_sync(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    """Make ``cls.sync_weights`` (TRL's colocate sync, unchanged inside) work on vLLM's CPU backend."""
    original = cls.sync_weights

    def sync_weights(self):
        if self.mode != "colocate":
            return original(self)
        reload_in_place(self.llm, lambda: original(self))

    monkeypatch.setattr(cls, "sync_weights", sync_weights)


def serve_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRL's colocated engine in float32, like the CPU trainer.

    TRL passes no dtype, and under ``dtype="auto"`` vLLM downcasts a float32 checkpoint to the platform's preferred
    dtype (bf16 on CPU); the importance-sampling correction absorbs that in real runs, but a test that checks the
    engine serves exactly the trained weights needs both sides in float32.
    """
    import trl.generation.vllm_generation as trl_vllm

    engine = trl_vllm.LLM
    monkeypatch.setattr(trl_vllm, "LLM", lambda *args, **kwargs: engine(*args, **{**kwargs, "dtype": "float32"}))


def build_documents_in_subprocess(folder: Path, num_documents: int, corpus_limit: int, seed: int) -> Path:
    """Real MemTrain documents (BM25 neighbours), built in a child interpreter.

    bm25s imports numba, and once llvmlite is imported vLLM 0.31's CPU engine fails to start (its Triton-kernel
    fallback scan, ``vllm.triton_utils.dispatcher._rebind_kernels``, calls ``vars(obj).get`` on llvmlite's ffi
    ``lib``, whose ``__dict__`` is a ctypes wrapper: ``AttributeError: '_lib_fn_wrapper' object has no attribute
    'get'``). So the documents are built where numba cannot reach the engine's process.
    """
    import subprocess

    tests = Path(__file__).resolve().parents[1]
    code = (
        f"import sys; sys.path.insert(0, {str(tests)!r}); from pathlib import Path; "
        f"from conftest import save_built_documents; "
        f"save_built_documents(Path({str(folder)!r}), {num_documents}, {corpus_limit}, {seed})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    return folder
