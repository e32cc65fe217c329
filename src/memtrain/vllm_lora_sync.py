"""Adapter-only vLLM sync for LoRA/QLoRA: the engine serves the frozen base once, each sync moves only the adapter.

The merged sync (:func:`memtrain.weight_sync.iter_vllm_weights`) pushes ``dequant(base) + scale * B @ A`` for every
layer, so vLLM must hold a dense copy of the whole model in the compute dtype (15.2 GB for a 7B in bf16) and the
sleep between steps must discard it (level 2). With ``vllm_lora_sync`` vLLM loads the base checkpoint once (dense,
or FP8 with ``vllm_quantization: fp8`` where the GPU has it) with LoRA enabled; each optimizer step the trainer
writes its adapter (the LoRA matrices, a few tens of MB for a 7B at rank 16) to a RAM-backed folder, names it in a
new ``LoRARequest`` and every engine call of the step generates through it. The base is never pushed again, so sleep
keeps it (level 1: offloaded, not discarded) and frees only the KV cache. In server mode (:class:`ServedAdapter`) the
adapter is loaded into a running ``vllm serve`` through its runtime LoRA endpoints, under a new name each sync.

The served policy is ``served base + adapter``: exact for a dense base, and for QLoRA/FP8 a base that differs from
the trainer's NF4 one by quantization noise, which the importance-sampling correction (``vllm_importance_sampling_
correction``, on by default) accounts for with the engine's own log-probs. vLLM serves a LoRA at about 1.33-1.39x the
time per output token of merged weights (huggingface/trl issue 5975), so this is the mode for cards without room
for a dense copy, not the default.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from memtrain.preflight import PreflightError


logger = logging.getLogger(__name__)


__all__ = [
    "VLLM_LORA_RANKS",
    "served_lora_rank",
    "adapter_rank",
    "adapter_tensors",
    "AdapterPublisher",
    "server_lora_command",
    "ServedAdapter",
]

# vllm/config/lora.py MaxLoRARanks (0.22 to 0.31): an engine's max_lora_rank must be one of these.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def served_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(
        f"lora_r={rank} is above vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]}); lower lora_r or set "
        "vllm_lora_sync: false (merged weights)"
    )


def adapter_rank(model: Any, adapter: str = "default") -> int:
    """The largest rank of the PEFT adapter, per-module ``rank_pattern`` overrides included."""
    config = model.peft_config[adapter]
    return max([int(config.r), *(int(r) for r in (getattr(config, "rank_pattern", None) or {}).values())])


def adapter_tensors(model: Any, dtype: torch.dtype | None, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's saved names, as new contiguous CPU tensors in ``dtype`` (the engine's).

    ``modules_to_save`` copies are refused: vLLM's LoRA cannot load whole replaced modules, so the served policy would
    silently miss them.
    """
    from peft.utils import get_peft_model_state_dict

    if getattr(model.peft_config[adapter], "modules_to_save", None):
        raise ValueError(
            "vllm_lora_sync cannot serve modules_to_save (vLLM's LoRA loads only LoRA matrices); drop "
            "lora_modules_to_save or set vllm_lora_sync: false (merged weights)"
        )
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {
        name: tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype, copy=True).contiguous()
        for name, tensor in state.items()
    }


def _ram_backed_root() -> str:
    """/dev/shm where it can be written (the adapter never touches a disk), else the temporary folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return str(shm)
    return tempfile.gettempdir()


class AdapterPublisher:
    """Writes the policy's adapter for each sync into a fresh folder and returns the ``LoRARequest`` that serves it.

    Every sync gets a new LoRA id (vLLM caches adapters by id; with ``max_loras=1`` the previous one is evicted when
    the new one is first used) and the previous folder is removed once the new one is written. The folder lives under
    ``root`` (default: /dev/shm) and is removed when the publisher is closed or garbage collected.
    """

    def __init__(self, root: str | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="memtrain-lora-", dir=root or _ram_backed_root()))
        self.version = 0
        self.last_bytes = 0
        self._current: Path | None = None
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    def publish(self, model: Any, dtype: torch.dtype | None, adapter: str = "default") -> Any:
        """Write ``model``'s adapter in ``dtype`` and return the new ``vllm.lora.request.LoRARequest``."""
        from vllm.lora.request import LoRARequest

        name, path = self.write(model, dtype, adapter)
        return LoRARequest(lora_name=name, lora_int_id=self.version, lora_path=path)

    def write(self, model: Any, dtype: torch.dtype | None, adapter: str = "default") -> tuple[str, str]:
        """Write ``model``'s adapter in ``dtype`` as PEFT saves it; returns its new name and folder."""
        from safetensors.torch import save_file

        tensors = adapter_tensors(model, dtype, adapter)
        self.version += 1
        target = self.folder / f"v{self.version}"
        target.mkdir()
        save_file(tensors, str(target / "adapter_model.safetensors"))
        model.peft_config[adapter].save_pretrained(str(target))  # adapter_config.json, as PEFT writes it
        self.last_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        previous, self._current = self._current, target
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return f"memtrain-policy-v{self.version}", str(target)

    def close(self) -> None:
        self._cleanup()


# ---------------------------------------------------------------------------------------------- server mode
def server_lora_command(model: str, rank: int) -> str:
    """How to start a server that loads adapters at runtime (TRL's command runs vLLM's own ``vllm serve``)."""
    return (
        f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 trl vllm-serve --model {model} --enable-lora "
        f"--max-lora-rank {served_lora_rank(rank)}"
    )


class ServedAdapter:
    """Server mode: each sync's adapter loaded into a running ``vllm serve`` (what ``trl vllm-serve`` starts) through
    vLLM's runtime LoRA endpoints, and served by name.

    Each sync loads the adapter under a new name (a new LoRA id, so no prefix-cache block computed with the previous
    weights is reused), points TRL's ``VLLMClient`` at it (its ``/v1/completions`` requests name ``client.model``),
    then unloads the previous one. The server reads the folder itself: it must see the trainer's files (the same
    machine, whose /dev/shm is the default, or a shared filesystem).
    """

    def __init__(self, client: Any, base_model: str, rank: int):
        self.client = client
        self.base_model = base_model
        self.rank = rank
        self.current: str | None = None

    def serve(self, name: str, path: str) -> None:
        """Load the adapter at ``path`` as ``name``, generate through it from now on, drop the previous one."""
        response = self.client.session.post(
            f"{self.client.base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
        )
        if response.status_code != 200:
            raise PreflightError(self._refusal(response, path))
        previous, self.current = self.current, name
        self.client.model = name
        if previous is not None:
            url = f"{self.client.base_url}/v1/unload_lora_adapter"
            unloaded = self.client.session.post(url, json={"lora_name": previous})
            if unloaded.status_code != 200:  # generation is unaffected; the server keeps one stale adapter
                logger.warning("the vLLM server did not unload adapter %s: %s", previous, unloaded.text[:200])

    def _refusal(self, response: Any, path: str) -> str:
        start = server_lora_command(self.base_model, self.rank)
        if response.status_code == 404 and "error" not in response.text:  # no such route: runtime LoRA loading is off
            return (
                f"the vLLM server at {self.client.base_url} cannot load LoRA adapters at runtime (no "
                f"/v1/load_lora_adapter): restart it as `{start}`, or set vllm_lora_sync: false (merged weights)"
            )
        message = " ".join(response.text.split())[:300]
        return (
            f"the vLLM server at {self.client.base_url} refused the adapter in {path} ({response.status_code}: "
            f"{message}): start it as `{start}` on a machine that sees that folder, or set vllm_lora_sync: false"
        )
