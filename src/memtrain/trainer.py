"""MemTrainer: multi-conversation GRPO over the memory agent (PAPER.md sections 3-5), as a ``trl.GRPOTrainer``.

TRL's GRPOTrainer trains one sequence per sample. A MemTrain sample is a whole rollout: T memory updates, one final
answer, and G2 recall answers, each generated from its own prompt. MemTrainer keeps TRL's machinery (dataloader and
RepeatSampler, generation backends with their weight sync, fused log-prob computation, reference model / disabled
adapters, logging, checkpoints) and replaces what happens between a batch of documents and the backward pass:

    documents (G1 copies each) -> MemoryAgent rollouts (one generator call per step)
    -> recall probes (one call, G2 answers each) -> reward functions -> rollout rewards R_i = sum_j w_j r_ij
    -> advantages (per document group; per probe group) -> one TrainingRow per model call
    -> micro-batches packed by a token budget -> PPO-clip loss (+ beta KL) on each row's own prompt only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from trl import GRPOTrainer

from memtrain.agent.generation import GenerationOutput, SamplingConfig
from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
from memtrain.agent.recall import (
    EntityFinder,
    EntityMasker,
    RecallProbe,
    build_recall_probes,
    default_entity_tools,
    row_document_template,
)
from memtrain.agent.search_agent import SearchAgent, SearchAgentConfig
from memtrain.agent.trajectory import Trajectory
from memtrain.configs import MemTrainConfig
from memtrain.grpo import (
    TrainingRow,
    assign_loss_weights,
    clipped_policy_loss,
    collate_rows,
    group_advantages,
    pack_micro_batches,
    sampling_logps_of,
    vllm_importance_weights,
)
from memtrain.models import upcast_trainable_params
from memtrain.preflight import check_grpo_options
from memtrain.retrieval import build_retriever
from memtrain.rewards import get_reward_funcs, recall_score
from memtrain.vllm_rollouts import VLLMRolloutSession, check_vllm_version, memtrain_vllm_generation, sync_counter


logger = logging.getLogger(__name__)


def build_search_agent(args: MemTrainConfig, tokenizer: Any, generator: Any) -> SearchAgent | None:
    """MEM1's search agent over an in-process index or a shared retriever service; None for the memory agent."""
    if args.agent_type != "search":
        return None
    return SearchAgent(tokenizer, generator, build_retriever(args), SearchAgentConfig.from_arguments(args))


class TrainerGenerator:
    """The agent's Generator over TRL's own generation path of a trainer.

    That path is transformers ``generate`` (unwrapping DeepSpeed ZeRO-3 / FSDP parameters for generation) or vLLM in
    colocate or server mode (weights synced to vLLM once per optimizer step). The per-call token budget (memory,
    answer) is applied by temporarily setting the trainer's completion length.
    """

    def __init__(self, trainer: GRPOTrainer):
        self.trainer = trainer
        self.calls = 0

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

    def _exchange(self, count: int, budget: int, done: bool) -> tuple[int, int, bool]:
        """One collective round: the widest batch, the largest budget, and whether every process is done."""
        accelerator = self.trainer.accelerator
        local = torch.tensor([[count, budget, int(done)]], device=accelerator.device)
        everyone = accelerator.gather(local)
        return int(everyone[:, 0].max()), int(everyone[:, 1].max()), bool(everyone[:, 2].min())

    @property
    def _filler_prompt(self) -> list[int]:
        tokenizer = self.trainer.processing_class
        return [tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id]

    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, sampling: SamplingConfig | None = None
    ) -> GenerationOutput:
        self.calls += 1
        expanded = [list(ids) for ids in prompt_ids for _ in range(n)]
        max_new_tokens = sampling.max_new_tokens if sampling is not None else self.trainer.max_completion_length
        if self.trainer.accelerator.num_processes == 1:
            completion_ids, logprobs = self._run(expanded, n, max_new_tokens) if expanded else ([], [])
        else:
            # Generation is collective across processes (FSDP/ZeRO-3 parameter gathering, vLLM server and tensor
            # parallel groups), but each process's memory loop makes its own number of calls with its own batch
            # size. So every call is a round in which all processes take part with equally wide batches.
            width, budget, _ = self._exchange(len(expanded), max_new_tokens, done=False)
            padded = expanded + [self._filler_prompt] * (width - len(expanded))
            completion_ids, logprobs = self._run(padded, 1, budget)
            completion_ids = completion_ids[: len(expanded)]
            logprobs = None if logprobs is None else logprobs[: len(expanded)]
        eos = set(self.trainer.eos_token_ids)
        finished = [bool(c) and c[-1] in eos for c in completion_ids]
        return GenerationOutput(completion_ids=completion_ids, finished=finished, logprobs=logprobs)

    def synchronize(self) -> None:
        """Join the other processes' remaining generation rounds until every process has finished its rollouts."""
        if self.trainer.accelerator.num_processes == 1:
            return
        while True:
            width, budget, all_done = self._exchange(0, 0, done=True)
            if all_done:
                return
            if width:
                self._run([self._filler_prompt] * width, 1, budget)


class MemTrainer(GRPOTrainer):
    """Multi-conversation GRPO for memory agents: a ``trl.GRPOTrainer`` whose samples are whole rollouts.

    Args:
        model: a model id/path or a loaded model (see memtrain.models).
        args: :class:`~memtrain.configs.MemTrainConfig`.
        agent_config: chunk and memory budgets, prompt templates.
        train_dataset: rows with ``prompt``, ``context``, ``answers``.
        entity_tools: (find_entities, mask_entity) for recall probes; spaCy's rule by default.
        reward_funcs: callables overriding ``args.reward_funcs`` (names are resolved through memtrain.rewards).
    """

    _tag_names = ["trl", "grpo", "memtrain", "memory-agent"]
    _name = "MemTrain"

    def __init__(
        self,
        model: Any,
        args: MemTrainConfig,
        agent_config: AgentConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list | None = None,
        entity_tools: tuple[EntityFinder, EntityMasker] | None = None,
        reward_funcs: list[Callable] | None = None,
    ):
        self.check_launcher(args)
        # GRPOConfig options MemTrainer's loss or rollouts would silently ignore, and a vLLM TRL cannot drive, are
        # refused before the model loads.
        check_grpo_options(args)
        if args.use_vllm:
            check_vllm_version()
        reward_funcs = reward_funcs if reward_funcs is not None else get_reward_funcs(args.reward_funcs)
        with memtrain_vllm_generation():  # QLoRA-safe sync and a dense engine for a 4-bit policy
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                peft_config=peft_config,
            )
        if getattr(self.model, "is_loaded_in_4bit", False):
            # TRL casts a quantized model's trainable weights to bf16, where Adam's small steps round away.
            upcast_trainable_params(self.model)
        if self.use_vllm:
            sync_counter(self.vllm_generation)  # every sync counted, for vllm/weight_syncs
        self.agent_config = agent_config or AgentConfig()
        self.templates = self.agent_config.templates()
        self.generator = TrainerGenerator(self)
        self.memory_agent = MemoryAgent(self.processing_class, self.generator, self.agent_config)
        self.search_agent = build_search_agent(args, self.processing_class, self.generator)
        self._entity_tools = entity_tools
        self._skip_next_optimizer_step = False
        self._last_trajectories: list[Trajectory] = []
        self._pending_loss_sums: dict[str, torch.Tensor] = {}  # entropy, KL, clipped, tokens summed per mode
        # vLLM importance sampling per mode: |logp diff| sum, count, max; ratio sum, count, min, max.
        self._pending_is_stats: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ launchers
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

    # ------------------------------------------------------------------ optimizer: skip empty steps
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

    # ------------------------------------------------------------------ generation + scoring
    @property
    def entity_tools(self) -> tuple[EntityFinder, EntityMasker]:
        if self._entity_tools is None:
            self._entity_tools = default_entity_tools()
        return self._entity_tools

    def _gather_floats(self, values: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return values
        return self.accelerator.gather(values.to(self.accelerator.device)).cpu()

    def _score_rollouts(self, trajectories: list[Trajectory], batch: list[dict], recall_rewards: list) -> torch.Tensor:
        """(n_rollouts, n_funcs) reward matrix in TRL's convention (None -> NaN)."""
        columns = {key: [row[key] for row in batch] for key in batch[0] if key not in {"prompt", "completion"}}
        completions = [t.answer for t in trajectories]
        completion_ids = [t.calls[-1].completion_ids if t.calls else [] for t in trajectories]
        rewards = torch.full((len(trajectories), len(self.reward_funcs)), math.nan)
        for j, func in enumerate(self.reward_funcs):
            values = func(
                prompts=[row["prompt"] for row in batch],
                completions=completions,
                completion_ids=completion_ids,
                recall_rewards=recall_rewards,
                trainer_state=self.state,
                **columns,
            )
            for i, value in enumerate(values):
                if value is not None:
                    rewards[i, j] = float(value)
        return rewards

    def _answer_probes(
        self, probes: list[RecallProbe | None]
    ) -> tuple[list[list[float]], GenerationOutput | None, list[list[int]]]:
        """G2 answers to every probe in one generator call: (scores per probe, the output, the probe prompts)."""
        live = [p for p in probes if p is not None]
        if not live:
            return [[] for _ in probes], None, []
        prompts = [self.memory_agent.encode_chat(self.templates.render_recall(p.memory, p.masked_chunk)) for p in live]
        output = self.generator.generate(
            prompts,
            n=self.args.recall_samples,
            sampling=SamplingConfig(max_new_tokens=self.agent_config.max_answer_tokens),
        )
        tokenizer = self.processing_class
        scores: list[list[float]] = []
        g2 = self.args.recall_samples
        live_index = 0
        for probe in probes:
            if probe is None:
                scores.append([])
                continue
            block = output.completion_ids[live_index * g2 : (live_index + 1) * g2]
            texts = tokenizer.batch_decode(block, skip_special_tokens=True)
            metric, lenient = self.args.recall_metric, self.args.lenient_recall
            scores.append([recall_score(text, probe.entity, metric, lenient) for text in texts])
            live_index += 1
        return scores, output, prompts

    def _rollout_and_score(self, batch: list[dict]) -> list[TrainingRow]:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        n_local = len(batch)
        start = time.perf_counter()
        # vLLM: one weight sync for all of the batch's agent calls, the engine awake between them, asleep (sleep
        # mode) before the old log-probs and backward passes.
        with VLLMRolloutSession(self):
            if self.search_agent is not None:
                trajectories = self.search_agent.rollout(batch, n=1)
            else:
                trajectories = self.memory_agent.rollout(
                    [row["context"] for row in batch],
                    [row["prompt"] for row in batch],
                    n=1,
                    doc_ids=[str(row.get("id", i)) for i, row in enumerate(batch)],
                    sampling=SamplingConfig(max_new_tokens=self.agent_config.max_memory_tokens),
                )

            recall_wanted = "memory_recall" in self.args.reward_funcs or self.args.train_recall_answers
            probes: list[RecallProbe | None] = [None] * n_local
            candidate_counts: Counter[str] = Counter()
            if recall_wanted and self.args.recall_samples > 0 and self.search_agent is None:
                find_entities, mask_entity = self.entity_tools
                seed = self.args.seed * 1_000_003 + self.state.global_step * 101 + self.accelerator.process_index
                probes = build_recall_probes(
                    trajectories, find_entities, mask_entity, self.args.recall_chunk_policy, seed=seed,
                    template=[row_document_template(row) for row in batch], counts=candidate_counts,
                )  # fmt: skip
            recall_scores, recall_output, recall_prompts = self._answer_probes(probes)
            self.generator.synchronize()
        recall_rewards = [sum(s) / len(s) if s else None for s in recall_scores]
        metrics["rollout_time"].append(time.perf_counter() - start)

        # Rollout rewards and advantages over the global batch: a document's G1 rollouts may sit on several processes.
        rewards_per_func = self._gather_floats(self._score_rollouts(trajectories, batch, recall_rewards))
        weights = torch.tensor(
            self.args.reward_weights if self.args.reward_weights is not None else [1.0] * len(self.reward_funcs)
        )
        total_rewards = torch.nansum(rewards_per_func * weights.unsqueeze(0), dim=1)
        n_global = total_rewards.numel()
        # Evaluation batches repeat each row num_generations_eval times (TRL's eval sampler).
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(n_global) // group_size
        rollout_adv = group_advantages(
            total_rewards, group_ids, self.args.scale_rewards, self.args.filter_zero_variance_groups
        )
        offset = self.accelerator.process_index * n_local
        local = slice(offset, offset + n_local)

        rows: list[TrainingRow] = []
        for i, trajectory in enumerate(trajectories):
            if not bool(rollout_adv.keep[local][i]):
                continue
            advantage = float(rollout_adv.advantages[local][i])
            for call in trajectory.calls:
                if call.completion_ids:
                    rows.append(
                        TrainingRow(
                            call.prompt_ids, call.completion_ids, advantage, call.kind, i,
                            sampling_logps=sampling_logps_of(call.logprobs, len(call.completion_ids)),
                        )
                    )  # fmt: skip

        # Each probe's G2 answers form their own group.
        probe_rewards = [score for scores in recall_scores for score in scores]
        recall_groups = [k for k, scores in enumerate(recall_scores) for _ in scores]
        recall_filtered = 0
        if probe_rewards and self.args.train_recall_answers and recall_output is not None:
            recall_adv = group_advantages(
                torch.tensor(probe_rewards),
                torch.tensor(recall_groups),
                self.args.scale_rewards,
                self.args.filter_zero_variance_groups,
            )
            recall_filtered = recall_adv.num_filtered_groups
            prompt_of_answer = [p for p in recall_prompts for _ in range(self.args.recall_samples)]
            sampled = recall_output.logprobs
            for a, completion in enumerate(recall_output.completion_ids):
                if bool(recall_adv.keep[a]) and completion:
                    rows.append(
                        TrainingRow(
                            prompt_of_answer[a], completion, float(recall_adv.advantages[a]), "recall", n_local + a,
                            sampling_logps=sampling_logps_of(None if sampled is None else sampled[a], len(completion)),
                        )
                    )  # fmt: skip

        # Old log-probs, when a step will score these rows after an update, are set by _prepare_inputs (TRL's rule);
        # evaluation never needs them (and may run before train() sets the accumulation steps).
        denominator_local = assign_loss_weights(rows, self.args.loss_aggregation)
        denominator = float(self._gather_floats(torch.tensor([denominator_local])).sum())
        assign_loss_weights(rows, self.args.loss_aggregation, total=denominator)

        self._log_rollout_metrics(
            metrics, trajectories, rewards_per_func, total_rewards, rollout_adv, probe_rewards, probes, rows,
            recall_filtered, candidate_counts,
        )  # fmt: skip
        self._last_trajectories = trajectories
        self._maybe_save_trajectories(trajectories, total_rewards[local].tolist(), recall_rewards)
        return rows

    def _log_rollout_metrics(
        self, metrics, trajectories, rewards_per_func, total_rewards, rollout_adv, probe_rewards, probes, rows,
        recall_filtered, candidate_counts,
    ) -> None:  # fmt: skip
        for j, func in enumerate(self.reward_funcs):
            column = rewards_per_func[:, j]
            valid = column[~torch.isnan(column)]
            metrics[f"rewards/{func.__name__}/mean"].append(float(valid.mean()) if len(valid) else math.nan)
        metrics["reward"].append(float(total_rewards.mean()))
        # Per-process counts summed over processes in one collective, so every logged value is the global one.
        updates = [c for t in trajectories for c in t.calls if c.kind == "update"]
        lengths = [len(c.completion_ids) for c in updates]
        local = [
            float(sum(probe_rewards)), float(len(probe_rewards)), float(sum(p is None for p in probes)),
            float(sum(t.metadata.get("num_searches", 0) for t in trajectories)), float(len(trajectories)),
            float(len(updates)), float(sum(lengths)), float(sum(not c.finished for c in updates)),
            float(sum(len(t.chunks) for t in trajectories)), float(len(rows)),
            float(sum(len(r.completion_ids) for r in rows)), float(recall_filtered),
            float(candidate_counts["candidates"]), float(candidate_counts["template_text"]),
            float(candidate_counts["chunk_edge"]), float(max(lengths, default=0)),
        ]  # fmt: skip
        gathered = self._gather_floats(torch.tensor([local], dtype=torch.float64)).view(-1, len(local))
        (recall_sum, recall_n, no_entity, searches, n_traj, n_updates, update_tokens, truncated, chunks, n_rows,
         n_tokens, recall_groups_filtered, candidates, template_text, chunk_edge) = gathered[:, :-1].sum(0).tolist()  # fmt: skip
        if self.search_agent is None:
            metrics["recall_accuracy"].append(recall_sum / recall_n if recall_n else math.nan)
            metrics["recall_probes_without_entity"].append(no_entity)
            # Entities refused as probe answers: read in "Document N:" header text, or cut by a chunk edge.
            if candidates:
                metrics["recall_candidates/template_text_ratio"].append(template_text / candidates)
                metrics["recall_candidates/chunk_edge_ratio"].append(chunk_edge / candidates)
        else:
            metrics["searches/mean"].append(searches / max(n_traj, 1.0))
        if n_updates:
            metrics["memory_tokens/mean"].append(update_tokens / n_updates)
            metrics["memory_tokens/max"].append(float(gathered[:, -1].max()))
            metrics["memory_truncated_ratio"].append(truncated / n_updates)
        metrics["chunks/mean"].append(chunks / max(n_traj, 1.0))
        metrics["rows_trained"].append(n_rows)
        metrics["tokens_trained"].append(n_tokens)
        metrics["groups_filtered"].append(float(rollout_adv.num_filtered_groups))
        metrics["recall_groups_filtered"].append(recall_groups_filtered)
        if self.log_completions:
            self._log_completions(trajectories, rewards_per_func, rollout_adv.advantages)

    def _log_completions(self, trajectories: list[Trajectory], rewards_per_func, advantages: torch.Tensor) -> None:
        """TRL's completions table, one row per rollout of the global batch: problem, memories, answer, rewards.

        ``GRPOTrainer.log`` prints a sample of ``num_completions_to_print`` rows (rich), writes the table to
        ``<output_dir>/completions/`` and sends it to wandb / trackio when they are in ``report_to``. Texts are
        gathered in process order, as ``rewards_per_func`` and ``advantages`` already are.
        """
        from accelerate.utils import gather_object

        def memories(trajectory: Trajectory) -> str:  # memories[0] is the initial one, written by no call
            return "\n\n".join(f"[{t}] {memory}" for t, memory in enumerate(trajectory.memories[1:], start=1))

        self._logs["prompt"].extend(gather_object([t.problem for t in trajectories]))
        self._logs["completion"].extend(gather_object([t.answer for t in trajectories]))
        self._logs["extra"]["memories"].extend(gather_object([memories(t) for t in trajectories]))
        self._logs["extra"]["doc_id"].extend(gather_object([t.doc_id for t in trajectories]))
        for j, func in enumerate(self.reward_funcs):
            self._logs["rewards"][func.__name__].extend(rewards_per_func[:, j].tolist())
        self._logs["advantages"].extend(advantages.tolist())

    def _maybe_save_trajectories(self, trajectories, rewards, recall_rewards) -> None:
        every = self.args.trajectory_html_steps
        if (
            not every
            or not self.model.training
            or self.state.global_step % every
            or not self.accelerator.is_main_process
        ):
            return
        from memtrain.viz import save_trajectory_html

        shown = trajectories[: self.args.trajectory_html_max]
        for trajectory, reward, recall in zip(shown, rewards, recall_rewards):
            trajectory.metadata.update({"reward": reward, "recall_reward": recall})
        path = Path(self.args.output_dir) / "trajectories" / f"step-{self.state.global_step:06d}.html"
        save_trajectory_html(shown, path)

    # ------------------------------------------------------------------ loss
    def _row_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (at the sampling temperature, as TRL) and entropies of each row's completion.

        Only the last ``C + 1`` positions get logits (``logits_to_keep``); positions come from the attention mask so
        a left-padded prompt is scored at the positions it was generated at. A plain log-softmax is used instead of
        TRL's chunked fused head, which is several times slower on CPU; the micro-batch token budget bounds memory.
        """
        completion_ids = batch["completion_ids"]
        input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        keep = completion_ids.size(1)
        with self.accelerator.autocast():
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep + 1
            ).logits
        log_probs = torch.log_softmax(logits[:, :-1, :].float() / self.temperature, dim=-1)
        logps = log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropies = -(log_probs.exp() * log_probs).sum(-1)
        return logps, entropies

    def compute_row_logps(self, rows: list[TrainingRow]) -> list[list[float]]:
        """Log-probs of each row's completion tokens given exactly its own prompt (for checks and old log-probs)."""
        micro_batches, n_micro = self._lockstep_micro_batches(rows)
        by_id: dict[int, list[float]] = {}
        with torch.no_grad():
            for k in range(n_micro):
                micro = micro_batches[k] if k < len(micro_batches) else self._dummy_rows()  # lockstep forwards
                batch = collate_rows(micro, self.processing_class.pad_token_id, self.accelerator.device)
                logps, _ = self._row_logps(self.model, batch)
                if k < len(micro_batches):
                    for i, row in enumerate(micro):
                        by_id[id(row)] = logps[i, : len(row.completion_ids)].float().cpu().tolist()
        return [by_id[id(row)] for row in rows]

    def _set_old_logps(self, rows: list[TrainingRow]) -> None:
        for row, logps in zip(rows, self.compute_row_logps(rows)):
            row.old_logps = logps

    def _ref_logps(self, model, batch: dict) -> torch.Tensor:
        from trl.trainer.utils import use_adapter

        with torch.no_grad():
            if self.ref_model is not None:
                return self._row_logps(self.ref_model, batch)[0]
            # PEFT: the reference is the base with the adapter off (or TRL's initial copy named "ref").
            peft_model = self.accelerator.unwrap_model(model)
            with use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None):
                return self._row_logps(model, batch)[0]

    def _micro_batch_loss(self, model, rows: list[TrainingRow], mode: str, record: bool = True) -> torch.Tensor:
        """The micro-batch's share of the step loss; ``record`` adds its token sums to the step's logged metrics."""
        batch = collate_rows(rows, self.processing_class.pad_token_id, self.accelerator.device)
        logps, entropies = self._row_logps(model, batch)
        old = batch.get("old_per_token_logps", logps.detach())
        ref = self._ref_logps(model, batch) if self.beta != 0.0 else None
        mask = batch["completion_mask"].to(logps.dtype)
        # TRL's vLLM importance sampling: the policy term is reweighted by pi_old / pi_vLLM (clipped or masked).
        is_weights, sampling = None, batch.get("sampling_per_token_logps")
        if self.use_vllm and self.vllm_importance_sampling_correction and sampling is not None:
            is_weights = vllm_importance_weights(
                old, sampling, mask, self.vllm_importance_sampling_mode,
                self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max,
            )  # fmt: skip
        per_token_loss, kl = clipped_policy_loss(
            logps, old, batch["advantages"], self.epsilon_low, self.epsilon_high, ref, self.beta, is_weights
        )
        loss = (per_token_loss * mask * batch["weights"].unsqueeze(1)).sum()

        if record and is_weights is not None:
            # TRL's sampling/* metrics: |old - sampling| over scored tokens, the ratio over tokens or sequences.
            valid = mask.bool()
            delta = (old - sampling).abs()
            delta = delta[valid & ~torch.isnan(delta)]
            ratios = is_weights.flatten() if is_weights.size(1) == 1 else is_weights[valid]
            inf = torch.tensor(math.inf, device=mask.device)
            stats = torch.stack([
                delta.sum(), torch.tensor(float(delta.numel()), device=mask.device),
                delta.max() if delta.numel() else torch.zeros((), device=mask.device),
                ratios.sum(), torch.tensor(float(ratios.numel()), device=mask.device),
                ratios.min() if ratios.numel() else inf, ratios.max() if ratios.numel() else -inf,
            ]).double()  # fmt: skip
            pending = self._pending_is_stats.get(mode)
            if pending is None:
                self._pending_is_stats[mode] = stats
            else:
                merged = pending + stats
                merged[2], merged[6] = torch.maximum(pending[2], stats[2]), torch.maximum(pending[6], stats[6])
                merged[5] = torch.minimum(pending[5], stats[5])
                self._pending_is_stats[mode] = merged

        if record:
            ratio = torch.exp(logps.detach() - old)
            advantages = batch["advantages"].unsqueeze(1)
            clipped = ((ratio < 1 - self.epsilon_low) & (advantages < 0)) | (
                (ratio > 1 + self.epsilon_high) & (advantages > 0)
            )
            kl_sum = (kl.detach() * mask).sum() if kl is not None else torch.zeros((), device=mask.device)
            sums = torch.stack([(entropies * mask).sum(), kl_sum, (clipped.float() * mask).sum(), mask.sum()])
            pending = self._pending_loss_sums.get(mode)
            self._pending_loss_sums[mode] = sums.double() if pending is None else pending + sums.double()
        return loss

    def _log_loss_metrics(self, mode: str) -> None:
        """Entropy, KL and clip ratio as token means over the whole step on every process (one collective)."""
        pending = self._pending_loss_sums.pop(mode, None)
        local = pending if pending is not None else torch.zeros(4, dtype=torch.float64, device=self.accelerator.device)
        # With vLLM importance sampling the step's sampling/* statistics ride in the same collective (every rank
        # takes this branch: the condition is the config's).
        with_is = self.use_vllm and self.vllm_importance_sampling_correction
        if with_is:
            empty = torch.tensor([0, 0, 0, 0, 0, math.inf, -math.inf], dtype=torch.float64)
            is_stats = self._pending_is_stats.pop(mode, None)
            is_stats = (is_stats if is_stats is not None else empty).to(local.device)
            local = torch.cat([local, is_stats])
        width = local.numel()
        gathered = self._gather_floats(local.view(1, width)).view(-1, width)
        entropy, kl, clipped, tokens = gathered[:, :4].sum(0).tolist()
        if not tokens:
            return
        metrics = self._metrics[mode]
        if with_is:
            delta_sum, delta_n, _, ratio_sum, ratio_n = gathered[:, 4:9].sum(0).tolist()
            if delta_n:
                metrics["sampling/sampling_logp_difference/mean"].append(delta_sum / delta_n)
                metrics["sampling/sampling_logp_difference/max"].append(float(gathered[:, 6].max()))
            if ratio_n:
                metrics["sampling/importance_sampling_ratio/min"].append(float(gathered[:, 9].min()))
                metrics["sampling/importance_sampling_ratio/mean"].append(ratio_sum / ratio_n)
                metrics["sampling/importance_sampling_ratio/max"].append(float(gathered[:, 10].max()))
        metrics["entropy"].append(entropy / tokens)
        if self.beta != 0.0:
            metrics["kl"].append(kl / tokens)
        metrics["clip_ratio/region_mean"].append(clipped / tokens)

    def _dummy_rows(self) -> list[TrainingRow]:
        pad = self.processing_class.pad_token_id
        return [TrainingRow([pad], [pad], 0.0, "dummy", -1, weight=0.0)]

    def _lockstep_micro_batches(self, rows: list[TrainingRow]) -> tuple[list[list[TrainingRow]], int]:
        """The rows' micro-batches and how many forwards every process runs: the most any process has.

        FSDP gathers parameters in every forward and DDP all-reduces in synced backwards, so each path that scores
        rows (backward, old log-probs, evaluation) runs zero-weight dummy micro-batches on the processes with fewer
        rows rather than leaving the others waiting in a collective.
        """
        micro_batches = pack_micro_batches(rows, self.args.max_tokens_per_microbatch)
        if self.accelerator.num_processes == 1:
            return micro_batches, len(micro_batches)
        return micro_batches, int(self._gather_floats(torch.tensor([float(len(micro_batches))])).max())

    def _micro_batch_context(self, model, last: bool) -> contextlib.AbstractContextManager:
        """The gradient reduction of one micro-batch's backward.

        DDP: one all-reduce per step, after the last micro-batch (``no_sync`` before it); every process holds the
        full gradient anyway. FSDP: a reduce-scatter after every micro-batch, so a process keeps only its gradient
        shard (``no_sync`` would hold the unsharded gradient, ~15 GB per GPU for a 7B model in bf16) and the step's
        sum is taken shard by shard in fp32 (see ``_fp32_reduce_policy``) rather than over hundreds of bf16 ones.
        """
        if last or self.accelerator.num_processes == 1 or self.is_fsdp_enabled:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        start = time.perf_counter()
        model.train()
        rows = self._prepare_inputs(inputs)
        loss = self._backward_rows(model, rows, "train")
        if self.accelerator.sync_gradients:
            # The Trainer steps the optimizer right after this micro-step (the gradient accumulation boundary): skip
            # that step exactly when none of its micro-steps had a row to learn from, on any process.
            self._skip_next_optimizer_step = not self._step_has_gradient
            self._step_has_gradient = False
        self._step += 1
        self._current_train_step_time += time.perf_counter() - start
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return loss

    def _backward_rows(self, model, rows: list[TrainingRow], mode: str) -> torch.Tensor:
        micro_batches, n_micro = self._lockstep_micro_batches(rows)
        total = torch.zeros((), device=self.accelerator.device)
        if n_micro == 0:
            # Every group of the micro-step was filtered on every process: nothing to learn from it.
            self._metrics[mode]["skipped_steps"].append(1.0)
            return total
        self._step_has_gradient = True
        self._metrics[mode]["skipped_steps"].append(0.0)
        # Weights are global token means; DDP/FSDP average gradients over processes, so undo that average, and
        # spread a generation batch over the optimizer steps that consume it.
        scale = (
            self.accelerator.num_processes * self.args.steps_per_generation / self.current_gradient_accumulation_steps
        )
        if self.is_fsdp_enabled and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)  # FSDP2: reduce every micro-batch, inside a Trainer no_sync too
        for k in range(n_micro):
            micro, factor = (micro_batches[k], 1.0) if k < len(micro_batches) else (self._dummy_rows(), 0.0)
            with self._micro_batch_context(model, last=k == n_micro - 1), self.compute_loss_context_manager():
                loss = self._micro_batch_loss(model, micro, mode, record=factor != 0.0) * (scale * factor)
                self.accelerator.backward(loss)
            total = total + loss.detach()
        self._log_loss_metrics(mode)
        return total

    def _needs_old_logps(self) -> bool:
        """Whether rows are scored after an optimizer step moved the policy that sampled them (TRL's rule).

        A generation serves ``steps_per_generation x num_iterations`` micro-steps; unless that divides the gradient
        accumulation steps, some of them fall after an optimizer step, and the PPO ratio needs the sampling-time
        log-probs.
        """
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0

    def _prepare_inputs(self, generation_batch: list[dict]) -> list[TrainingRow]:
        if not self.model.training:
            return self._rollout_and_score(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            rows = self._rollout_and_score(generation_batch)
            if self._needs_old_logps():
                # Old log-probs now, before any update (the branch is the config's, so every process takes it).
                self._set_old_logps(rows)
            random.Random(self.args.seed + self._step).shuffle(rows)
            shards = self.args.steps_per_generation
            self._buffered_inputs = [rows[s::shards] for s in range(shards)]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        rows = self._prepare_inputs(inputs)
        micro_batches, n_micro = self._lockstep_micro_batches(rows)
        loss = torch.zeros((), device=self.accelerator.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            for k in range(n_micro):
                if k < len(micro_batches):
                    loss = loss + self._micro_batch_loss(model, micro_batches[k], "eval")
                else:  # the forward other processes are running, in lockstep
                    self._micro_batch_loss(model, self._dummy_rows(), "eval", record=False)
        self._log_loss_metrics("eval")
        # Row weights are global means, so each process holds its share; the Trainer averages the shares.
        return (loss * self.accelerator.num_processes).detach(), None, None
