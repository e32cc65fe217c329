"""MemTrainer's logging: a step's rollout and loss metrics, TRL's completions table, trajectory HTML pages.

Every logged value is global: per-process sums travel in one collective (``_gather_floats``) and are divided after.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from memtrain.agent.trajectory import Trajectory


class TrainerLoggingMixin:
    """What MemTrainer records of a step (mixed into :class:`memtrain.trainer.MemTrainer`): metrics, tables, pages."""

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
