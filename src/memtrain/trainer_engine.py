"""MemTrainer's engine glue: how it drives TRL's generation, refuses launchers, reduces gradients, steps the optimizer.

- :class:`TrainerGenerator`: the agents' ``Generator`` over TRL's own generation path (transformers ``generate`` or
  vLLM), with every process joining each generation round where a call is a collective.
- :class:`TrainerEngineMixin`: the launcher check (no DeepSpeed), FSDP2's fp32 gradient reduction, the optimizer
  guard that skips a step with no gradient, and the one collective that gathers floats from every process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from typing import Any

import torch
from trl import GRPOTrainer

from memtrain.agent.generation import GenerationOutput, SamplingConfig
from memtrain.agent.request_stream import StreamRequest


logger = logging.getLogger(__name__)


class TrainerGenerator:
    """The agent's Generator over TRL's own generation path of a trainer.

    That path is transformers ``generate`` (unwrapping DeepSpeed ZeRO-3 / FSDP parameters for generation) or vLLM in
    colocate or server mode (weights synced to vLLM once per optimizer step). The per-call token budget (memory,
    answer) is applied by temporarily setting the trainer's completion length. Where the engine streams (a colocated
    engine per process or per tensor-parallel group, or a server each process sends its own requests to) every call
    goes to ``vllm_generation.stream`` instead.
    """

    def __init__(self, trainer: GRPOTrainer):
        self.trainer = trainer
        self.calls = 0
        self.peak_sequences = 0  # the most sequences one stream ran at once, since take_peak_sequences

    @contextlib.contextmanager
    def _max_new_tokens(self, max_new_tokens: int):
        trainer = self.trainer
        saved = trainer.max_completion_length
        vllm = getattr(trainer, "vllm_generation", None) if trainer.use_vllm else None
        generation_config = getattr(trainer, "generation_config", None)
        saved_config = getattr(generation_config, "max_new_tokens", None)
        trainer.max_completion_length = max_new_tokens
        if vllm is not None:
            vllm.max_completion_length = max_new_tokens
        if generation_config is not None:
            generation_config.max_new_tokens = max_new_tokens
        try:
            yield
        finally:
            trainer.max_completion_length = saved
            if vllm is not None:
                vllm.max_completion_length = saved
            if generation_config is not None:
                generation_config.max_new_tokens = saved_config

    def _run(self, prompts: list[list[int]], n: int, max_new_tokens: int) -> tuple[list[list[int]], list | None]:
        with self._max_new_tokens(max_new_tokens):
            completion_ids, logprobs = self.trainer._generate_single_turn(prompts, None, {}, n)
        return [list(c) for c in completion_ids], logprobs

    def _all_done(self, done: bool) -> bool:
        """One collective round: whether every process is done (each process's call pairs with the others')."""
        accelerator = self.trainer.accelerator
        everyone = accelerator.gather(torch.tensor([int(done)], device=accelerator.device))
        return bool(everyone.min())

    @property
    def collective(self) -> bool:
        """Whether a generation call is a collective across processes, so that every process must join each round.

        Yes for transformers ``generate`` on several processes (FSDP gathers parameters in every forward) and for a
        colocated engine split over a tensor-parallel group. No for a colocated engine per process (tensor-parallel
        size 1, every vLLM recipe's setting) and for server mode, where every process sends its own requests from its
        own client (TRL's path would gather every process's prompts to the main one and slice the completions back
        by equal widths): none waits for another's rounds.
        """
        trainer = self.trainer
        if trainer.accelerator.num_processes == 1:
            return False
        if not trainer.use_vllm:
            return True
        vllm = trainer.vllm_generation
        if vllm.mode == "server":
            return not getattr(vllm, "streams", False)
        return int(getattr(vllm, "tensor_parallel_size", 1)) > 1

    @property
    def _idle_rows(self) -> list[list[int]]:
        """What a process with nothing to generate sends to a collective round.

        Under vLLM's tensor-parallel group nothing: the group gathers each process's own prompts and budget
        (``memtrain.vllm_agent_calls.AgentCallsMixin._generate_in_group``). Under transformers ``generate`` one filler row, decoded for
        one token: FSDP runs it with ``synced_gpus`` (the default for an FSDP-managed model), so a process whose rows
        are done keeps joining the others' forwards until every process is done, and each process generates its own
        batch to its own budget; the calls only have to pair up one to one.
        """
        return [] if self.trainer.use_vllm else [self._filler_prompt]

    @property
    def streaming(self) -> bool:
        """Whether the agents' calls are streamed into the engine (:mod:`memtrain.agent.request_stream`): a colocated
        vLLM engine per process or per tensor-parallel group, or a server."""
        trainer = self.trainer
        return bool(trainer.use_vllm and getattr(trainer.vllm_generation, "streams", False))

    def stream(self, requests: list[StreamRequest]) -> None:
        """Stream requests into the engine; completions ending in EOS are ``finished``.

        Over a tensor-parallel group a stream is a round: the group's processes stream together, each with its own
        requests, and a process with none left joins from :meth:`synchronize`.
        """
        eos = set(self.trainer.eos_token_ids)

        def finishing(request: StreamRequest) -> StreamRequest:
            def on_done(output: GenerationOutput) -> list[StreamRequest]:
                output.finished = [bool(c) and c[-1] in eos for c in output.completion_ids]
                return [finishing(follow_up) for follow_up in request.on_done(output)]

            return replace(request, on_done=on_done)

        self.calls += 1
        if self.collective:
            self._all_done(False)
        peak = self.trainer.vllm_generation.stream([finishing(r) for r in requests])
        self.peak_sequences = max(self.peak_sequences, peak)

    def take_peak_sequences(self) -> int:
        """The most sequences the engine ran at once since the last call (0 without a stream), then reset.

        Logged per step as ``vllm/peak_sequences``: far below the step's trajectories x samples means the KV cache,
        not the batch, bounds the rollouts' concurrency (raise ``vllm_gpu_memory_utilization`` or shorten budgets).
        """
        peak, self.peak_sequences = self.peak_sequences, 0
        return peak

    @property
    def _filler_prompt(self) -> list[int]:
        tokenizer = self.trainer.processing_class
        return [tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id]

    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, sampling: SamplingConfig | None = None
    ) -> GenerationOutput:
        if self.streaming:  # one path for every call: a stream (TRL's server path would be a collective)
            return self._generate_as_requests(prompt_ids, n, sampling)
        self.calls += 1
        expanded = [list(ids) for ids in prompt_ids for _ in range(n)]
        max_new_tokens = sampling.max_new_tokens if sampling is not None else self.trainer.max_completion_length
        if not self.collective:
            completion_ids, logprobs = self._run(expanded, n, max_new_tokens) if expanded else ([], [])
        else:
            # Generation is collective across processes (FSDP parameter gathering, vLLM tensor-parallel groups), but
            # each process's memory loop makes its own number of calls with its own batch size and budget. So every
            # call is a round in which all processes take part, each with its own rows.
            self._all_done(False)
            rows = expanded or self._idle_rows
            completion_ids, logprobs = self._run(rows, 1, max_new_tokens if expanded else 1)
            completion_ids = completion_ids[: len(expanded)]
            logprobs = None if logprobs is None else logprobs[: len(expanded)]
        eos = set(self.trainer.eos_token_ids)
        finished = [bool(c) and c[-1] in eos for c in completion_ids]
        return GenerationOutput(completion_ids=completion_ids, finished=finished, logprobs=logprobs)

    def _generate_as_requests(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig | None
    ) -> GenerationOutput:
        """One call as one stream of per-prompt requests; the completions in prompt order."""
        sampling = sampling or SamplingConfig(max_new_tokens=self.trainer.max_completion_length)
        outputs: list[GenerationOutput | None] = [None] * len(prompt_ids)

        def keep(index: int):
            return lambda output: outputs.__setitem__(index, output) or []

        self.stream([StreamRequest(list(ids), n, sampling, keep(i), key=i) for i, ids in enumerate(prompt_ids)])
        return GenerationOutput.concatenate(outputs)

    def synchronize(self) -> None:
        """Join the other processes' remaining generation rounds until every process has finished its rollouts."""
        if not self.collective:
            return
        while not self._all_done(True):
            if self.streaming:  # a tensor-parallel group's stream, joined with no request of this process's
                self.trainer.vllm_generation.stream([])
            else:
                self._run(self._idle_rows, 1, 1)


class TrainerEngineMixin:
    """MemTrainer's launcher, gradient-reduction and optimizer glue (mixed into :class:`memtrain.trainer.MemTrainer`).

    It relies on ``trl.GRPOTrainer``'s attributes (``accelerator``, ``args``) and on ``_skip_next_optimizer_step``,
    which :meth:`memtrain.trainer_loss.TrainerLossMixin.training_step` sets at each gradient accumulation boundary.
    """

    @staticmethod
    def check_launcher(args: Any = None, deepspeed_enabled: bool = False) -> None:
        """Refuse DeepSpeed (ZeRO-1/2/3) before anything loads: its engine steps the optimizer in synced backwards.

        A MemTrainer step runs one backward per micro-batch (hundreds for a long document), so under DeepSpeed one
        training step would become many optimizer steps on fractions of the rows. FSDP2 shards the same way and
        lets the trainer take exactly one optimizer step per training step.
        """
        launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in {"1", "true", "yes"}
        if deepspeed_enabled or launched or getattr(args, "deepspeed", None):
            raise ValueError(
                "MemTrainer does not run under DeepSpeed (its engine would step the optimizer once per micro-batch "
                "instead of once per training step); launch with --config_file recipes/accelerate_configs/fsdp.yaml "
                "(FSDP2) instead."
            )

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.check_launcher(self.args, self.is_deepspeed_enabled)  # also a DeepSpeed plugin passed in code
        state = self.accelerator.state
        plugin = getattr(state, "fsdp_plugin", None)
        fsdp = f" (FSDP{getattr(plugin, 'fsdp_version', 1)})" if plugin is not None else ""
        logger.info(
            "launch: %d process(es), %s%s on %s", state.num_processes, state.distributed_type.value, fsdp, state.device
        )
        # Runs before the model is sharded (Trainer.train prepares it), so fully_shard takes the fp32 reduction.
        policy = self._fp32_reduce_policy(getattr(self.accelerator.state, "fsdp_plugin", None))
        if policy is not None:
            self.accelerator.state.fsdp_plugin.mixed_precision_policy = policy

    @staticmethod
    def _fp32_reduce_policy(plugin: Any) -> Any:
        """FSDP2 with bf16/fp16 compute: the same policy with gradients reduced and accumulated in fp32, or None.

        Accelerate's ``mixed_precision: bf16`` gives FSDP2 ``reduce_dtype=bf16``, but it keeps fp32 masters for
        trainable parameters; a step sums one reduce-scatter per micro-batch (hundreds of them), which bf16 rounds
        away. fp32 doubles the reduce-scatter traffic of a step, overlapped with the backward; the sharded fp32
        gradient is kept either way.
        """
        if plugin is None or getattr(plugin, "fsdp_version", 1) != 2:
            return None
        policy = plugin.mixed_precision_policy
        low = (torch.bfloat16, torch.float16)
        if policy is None or policy.param_dtype not in low or policy.reduce_dtype == torch.float32:
            return None  # no low-precision compute: gradients already reduce in the parameters' own dtype
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(
            param_dtype=policy.param_dtype, reduce_dtype=torch.float32, output_dtype=policy.output_dtype,
            cast_forward_inputs=policy.cast_forward_inputs,
        )  # fmt: skip

    _step_has_gradient = False  # some micro-step of the current optimizer step had rows (on some process)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if not getattr(optimizer, "_memtrain_guarded", False):
            step = optimizer.step

            def guarded_step(*step_args, **step_kwargs):
                # A step whose every group was filtered has no gradient; skipping keeps weight decay and Adam's
                # momentum from moving the weights anyway. The flag is set for exactly this step (training_step,
                # at the gradient accumulation boundary), so a stale one can never skip a later real update.
                skip, self._skip_next_optimizer_step = self._skip_next_optimizer_step, False
                if skip:
                    return None
                return step(*step_args, **step_kwargs)

            optimizer.step = guarded_step
            optimizer._memtrain_guarded = True
        return optimizer

    def _gather_floats(self, values: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return values
        return self.accelerator.gather(values.to(self.accelerator.device)).cpu()
