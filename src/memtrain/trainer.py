"""MemTrainer: multi-conversation GRPO over the memory agent (PAPER.md sections 3-5), as a ``trl.GRPOTrainer``.

TRL's GRPOTrainer trains one sequence per sample. A MemTrain sample is a whole rollout: T memory updates, one final
answer, and G2 recall answers, each generated from its own prompt. MemTrainer keeps TRL's machinery (dataloader and
RepeatSampler, generation backends with their weight sync, fused log-prob computation, reference model / disabled
adapters, logging, checkpoints) and replaces what happens between a batch of documents and the backward pass:

    documents (G1 copies each) -> MemoryAgent rollouts (one generator call per step)
    -> recall probes (one call, G2 answers each) -> reward functions -> rollout rewards R_i = sum_j w_j r_ij
    -> advantages (per document group; per probe group) -> one TrainingRow per model call
    -> micro-batches packed by a token budget -> PPO-clip loss (+ beta KL) on each row's own prompt only.

MemTrainer is split by concern, one room each (every one a mixin of the class below):

- here: construction, and the step from a batch of documents to training rows (rollouts, recall probes, rewards,
  advantages, the generation buffer of ``_prepare_inputs``);
- :mod:`memtrain.trainer_loss`: row log-probs (policy, old, reference), the micro-batch loss, backward, evaluation;
- :mod:`memtrain.trainer_logging`: rollout and loss metrics, TRL's completions table, trajectory HTML pages;
- :mod:`memtrain.trainer_engine`: TRL's generation as the agents' Generator, launcher checks, FSDP2's fp32 gradient
  reduction, the optimizer guard.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from trl import GRPOTrainer

from memtrain.agent.generation import GenerationOutput, SamplingConfig
from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
from memtrain.agent.recall import (
    EntityFinder,
    EntityMasker,
    RecallEntities,
    RecallProbe,
    build_recall_probes,
    default_entity_tools,
    row_document_template,
)
from memtrain.agent.recall_stream import RecallProbeStream
from memtrain.agent.request_stream import run_requests
from memtrain.agent.search_agent import SearchAgent, SearchAgentConfig
from memtrain.agent.trajectory import Trajectory
from memtrain.configs import MemTrainConfig
from memtrain.grpo import (
    TrainingRow,
    assign_loss_weights,
    group_advantages,
    sampling_logps_of,
)
from memtrain.models import upcast_trainable_params
from memtrain.preflight import check_grpo_options, check_vllm_lora_sync
from memtrain.retrieval import build_retriever
from memtrain.rewards import get_reward_funcs, recall_score
from memtrain.trainer_engine import TrainerEngineMixin, TrainerGenerator
from memtrain.trainer_logging import TrainerLoggingMixin
from memtrain.trainer_loss import TrainerLossMixin
from memtrain.vllm_rollouts import VLLMRolloutSession, check_vllm_version, memtrain_vllm_generation, sync_counter


def build_search_agent(args: MemTrainConfig, tokenizer: Any, generator: Any) -> SearchAgent | None:
    """MEM1's search agent over an in-process index or a shared retriever service; None for the memory agent."""
    if args.agent_type != "search":
        return None
    return SearchAgent(tokenizer, generator, build_retriever(args), SearchAgentConfig.from_arguments(args))


class MemTrainer(TrainerEngineMixin, TrainerLossMixin, TrainerLoggingMixin, GRPOTrainer):
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
        check_vllm_lora_sync(args, peft=peft_config is not None or hasattr(model, "peft_config"))
        if args.use_vllm:
            check_vllm_version()
        reward_funcs = reward_funcs if reward_funcs is not None else get_reward_funcs(args.reward_funcs)
        # QLoRA-safe sync, a dense engine for a 4-bit policy, adapter-only sync with vllm_lora_sync
        with memtrain_vllm_generation(args.vllm_lora_sync, args.vllm_quantization, args.vllm_max_num_seqs):
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

    # ------------------------------------------------------------------ generation + scoring
    @property
    def entity_tools(self) -> tuple[EntityFinder, EntityMasker]:
        if self._entity_tools is None:
            self._entity_tools = default_entity_tools()
        return self._entity_tools

    @property
    def recall_entities(self) -> RecallEntities:
        """Recall candidates: the rows' stored ``entities`` mapped onto chunks, else tagged in a background thread."""
        if getattr(self, "_recall_entities", None) is None:
            config = self.agent_config
            self._recall_entities = RecallEntities(
                self.processing_class, config.chunk_size, config.max_chunks, self.entity_tools[0]
            )
        return self._recall_entities

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

    def _score_probes(
        self, recall: RecallProbeStream | None, n_local: int
    ) -> tuple[list[list[float]], GenerationOutput | None, list[list[int]]]:
        """Each probe's G2 answers scored: (scores per rollout, the answers of all probes in order, their prompts)."""
        if recall is None or not recall.outputs:
            return [[] for _ in range(n_local)], None, []
        answered = sorted(recall.outputs)
        output = GenerationOutput.concatenate([recall.outputs[index] for index in answered])
        scores: list[list[float]] = [[] for _ in range(n_local)]
        metric, lenient = self.args.recall_metric, self.args.lenient_recall
        for index in answered:
            texts = self.processing_class.batch_decode(recall.outputs[index].completion_ids, skip_special_tokens=True)
            scores[index] = [recall_score(text, recall.probes[index].entity, metric, lenient) for text in texts]
        return scores, output, [recall.prompts[index] for index in answered]

    def _recall_stream(self, trajectories: list[Trajectory], batch: list[dict], pending: Any, counts: Counter):
        """The batch's recall probes, planned once the entity candidates are known, asked as their memories appear."""
        find_entities, mask_entity = self.entity_tools
        seed = self.args.seed * 1_000_003 + self.state.global_step * 101 + self.accelerator.process_index

        def plan() -> list[RecallProbe | None]:
            return build_recall_probes(
                trajectories, find_entities, mask_entity, self.args.recall_chunk_policy, seed=seed,
                template=[row_document_template(row) for row in batch], counts=counts,
                chunk_entities=pending.result(trajectories),
            )  # fmt: skip

        def prompt_of(probe: RecallProbe) -> list[int]:
            return self.memory_agent.encode_chat(self.templates.render_recall(probe.memory, probe.masked_chunk))

        sampling = SamplingConfig(max_new_tokens=self.agent_config.max_answer_tokens)
        return RecallProbeStream(trajectories, plan, pending.done, prompt_of, self.args.recall_samples, sampling)

    def _rollout_and_score(self, batch: list[dict]) -> list[TrainingRow]:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        n_local = len(batch)
        start = time.perf_counter()
        # vLLM: one weight sync for all of the batch's agent calls, the engine awake between them, asleep (sleep
        # mode) before the old log-probs and backward passes.
        with VLLMRolloutSession(self):
            recall_wanted = "memory_recall" in self.args.reward_funcs or self.args.train_recall_answers
            recall_wanted = recall_wanted and self.args.recall_samples > 0 and self.search_agent is None
            # found while the engine generates: stored entities mapped onto the chunks, else spaCy in a thread
            pending = self.recall_entities.start(batch) if recall_wanted else None
            recall = None
            candidate_counts: Counter[str] = Counter()
            if self.search_agent is not None:
                trajectories = self.search_agent.rollout(batch, n=1)
            else:
                trajectories = self.memory_agent.prepare(
                    [row["context"] for row in batch], [row["prompt"] for row in batch], n=1,
                    doc_ids=[str(row.get("id", i)) for i, row in enumerate(batch)],
                )  # fmt: skip
                # probes asked as soon as their memory exists, in the rollouts' stream (or their steps' calls)
                if pending is not None:
                    recall = self._recall_stream(trajectories, batch, pending, candidate_counts)
                self.memory_agent.run(
                    trajectories, sampling=SamplingConfig(max_new_tokens=self.agent_config.max_memory_tokens),
                    after_update=None if recall is None else recall.after_update,
                )  # fmt: skip
                if recall is not None:
                    run_requests(self.generator, recall.finish())
            probes: list[RecallProbe | None] = [None] * n_local if recall is None else recall.probes
            recall_scores, recall_output, recall_prompts = self._score_probes(recall, n_local)
            self.generator.synchronize()
            if self.generator.streaming:
                metrics["vllm/peak_sequences"].append(float(self.generator.take_peak_sequences()))
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
