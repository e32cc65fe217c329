"""MemTrainer's loss: each training row scored on exactly its own prompt, PPO-clip (+ beta KL) per micro-batch, backward.

A step's rows are packed into token-budget micro-batches; every process runs as many forwards as the busiest one
(zero-weight dummy micro-batches) so FSDP's and DDP's collectives stay in lockstep on every path: backward, old
log-probs and evaluation. The step's entropy / KL / clip sums are logged by
:meth:`memtrain.trainer_logging.TrainerLoggingMixin._log_loss_metrics`.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from memtrain.grpo import (
    TrainingRow,
    clipped_policy_loss,
    collate_rows,
    pack_micro_batches,
    vllm_importance_weights,
)
from memtrain.shared_prompts import score_rows, shared_prompt_micro_batches


class TrainerLossMixin:
    """Row log-probs (policy, old, reference), the micro-batch loss and the backward of a step (for MemTrainer).

    Overrides ``training_step`` and ``prediction_step`` of ``trl.GRPOTrainer``; the rows come from
    ``MemTrainer._prepare_inputs`` (rollouts and scoring, :mod:`memtrain.trainer`).
    """

    def _row_logps(self, model, rows: list[TrainingRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (at the sampling temperature, as TRL) and entropies of each row's completion.

        Rows that share their exact prompt are scored in one sequence that encodes the prompt once
        (:mod:`memtrain.shared_prompts`, ``share_prompts``); the LM head runs only at completion positions, a slice
        of the vocabulary logits at a time (:mod:`memtrain.logprob_head`). Values equal the row-by-row forward.
        """
        core = self.accelerator.unwrap_model(model)
        core = core.get_base_model() if hasattr(core, "get_base_model") else core
        with self.accelerator.autocast():
            return score_rows(
                model, core, rows, self.processing_class.pad_token_id, self.temperature, self.accelerator.device,
                share_prompts=self.args.share_prompts,
            )  # fmt: skip

    def compute_row_logps(self, rows: list[TrainingRow]) -> list[list[float]]:
        """Log-probs of each row's completion tokens given exactly its own prompt (for checks and old log-probs)."""
        micro_batches, n_micro = self._lockstep_micro_batches(rows)
        by_id: dict[int, list[float]] = {}
        with torch.no_grad():
            for k in range(n_micro):
                micro = micro_batches[k] if k < len(micro_batches) else self._dummy_rows()  # lockstep forwards
                logps, _ = self._row_logps(self.model, micro)
                if k < len(micro_batches):
                    for i, row in enumerate(micro):
                        by_id[id(row)] = logps[i, : len(row.completion_ids)].float().cpu().tolist()
        return [by_id[id(row)] for row in rows]

    def _set_old_logps(self, rows: list[TrainingRow]) -> None:
        for row, logps in zip(rows, self.compute_row_logps(rows)):
            row.old_logps = logps

    def _ref_logps(self, model, rows: list[TrainingRow]) -> torch.Tensor:
        from trl.trainer.utils import use_adapter

        with torch.no_grad():
            if self.ref_model is not None:
                return self._row_logps(self.ref_model, rows)[0]
            # PEFT: the reference is the base with the adapter off (or TRL's initial copy named "ref").
            peft_model = self.accelerator.unwrap_model(model)
            with use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None):
                return self._row_logps(model, rows)[0]

    def _micro_batch_loss(self, model, rows: list[TrainingRow], mode: str, record: bool = True) -> torch.Tensor:
        """The micro-batch's share of the step loss; ``record`` adds its token sums to the step's logged metrics."""
        batch = collate_rows(rows, self.processing_class.pad_token_id, self.accelerator.device)
        logps, entropies = self._row_logps(model, rows)
        old = batch.get("old_per_token_logps", logps.detach())
        ref = self._ref_logps(model, rows) if self.beta != 0.0 else None
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

    def _dummy_rows(self) -> list[TrainingRow]:
        pad = self.processing_class.pad_token_id
        return [TrainingRow([pad], [pad], 0.0, "dummy", -1, weight=0.0)]

    def _lockstep_micro_batches(self, rows: list[TrainingRow]) -> tuple[list[list[TrainingRow]], int]:
        """The rows' micro-batches and how many forwards every process runs: the most any process has.

        FSDP gathers parameters in every forward and DDP all-reduces in synced backwards, so each path that scores
        rows (backward, old log-probs, evaluation) runs zero-weight dummy micro-batches on the processes with fewer
        rows rather than leaving the others waiting in a collective.
        """
        pack = shared_prompt_micro_batches if self.args.share_prompts else pack_micro_batches
        micro_batches = pack(rows, self.args.max_tokens_per_microbatch)
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
