"""Multi-conversation GRPO arithmetic: group advantages, one training row per model call, loss weights, packing.

Pure functions (no model, no trainer state) so every number can be checked by hand in the tests. A rollout's
advantage is shared by all of its model calls (memory updates and the final answer); each recall probe's G2 answers
form a group of their own (PAPER.md section 5). A row is exactly the prompt a call was generated from plus that
call's completion: turns are never concatenated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor  # (n,)
    keep: torch.Tensor  # (n,) bool: False for members of filtered (zero-variance) groups
    num_groups: int
    num_filtered_groups: int


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale_rewards: str = "none", filter_zero_variance: bool = False
) -> GroupAdvantages:
    """Mean-centred advantages within each group, optionally divided by a std.

    ``scale_rewards``: ``none`` (the paper, as Dr. GRPO), ``group`` (divide by the group's std) or ``batch`` (by the
    std over all rewards). With ``filter_zero_variance`` (DAPO) groups whose rewards are all equal are dropped.
    NaN rewards (a reward function returned None) count as 0, as TRL's nansum does.
    """
    rewards = torch.nan_to_num(rewards.to(torch.float64), nan=0.0)
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = len(unique)
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards))
    means = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, rewards) / counts
    centred = rewards - means[inverse]
    variances = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, centred**2)
    # Unbiased std as torch.std (and TRL) computes it; single-member groups have zero spread.
    group_std = torch.sqrt(variances / (counts - 1).clamp(min=1))
    zero_variance = variances[inverse] <= 1e-12

    if scale_rewards == "group":
        advantages = centred / (group_std[inverse] + 1e-4)
    elif scale_rewards == "batch":
        advantages = centred / (rewards.std() + 1e-4) if len(rewards) > 1 else centred
    elif scale_rewards == "none":
        advantages = centred
    else:
        raise ValueError(f"scale_rewards must be `none`, `group` or `batch`, got {scale_rewards!r}.")

    keep = ~zero_variance if filter_zero_variance else torch.ones_like(zero_variance)
    num_filtered = int((variances <= 1e-12).sum()) if filter_zero_variance else 0
    return GroupAdvantages(advantages.to(torch.float32), keep, num_groups, num_filtered)


@dataclass
class TrainingRow:
    """One model call as a training sequence: loss on ``completion_ids`` only, given exactly ``prompt_ids``.

    ``conversation`` identifies the rollout (or recall answer) the call belongs to, for ``rollout_mean``.
    ``weight`` is the per-token loss weight, set by :func:`assign_loss_weights`. ``old_logps`` are the policy's
    log-probs before the step's updates (only when they can differ from the current ones); ``sampling_logps`` are
    the log-probs the completion was sampled with (vLLM; NaN where the engine gave none), for TRL's importance
    sampling correction of the engine/trainer mismatch.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    kind: str
    conversation: int
    weight: float = 0.0
    old_logps: list[float] | None = None
    sampling_logps: list[float] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def sampling_logps_of(logprobs: list | None, length: int) -> list[float] | None:
    """A call's generation-time log-probs as a row's ``sampling_logps``: None entries (unscored by vLLM) as NaN."""
    if logprobs is None:
        return None
    values = [math.nan if value is None else float(value) for value in logprobs[:length]]
    return values + [math.nan] * (length - len(values))


LOSS_AGGREGATIONS = ("conversation_mean", "token_mean", "rollout_mean")


def assign_loss_weights(rows: list[TrainingRow], aggregation: str, total: float | None = None) -> float:
    """Set each row's per-token weight so the step's loss is the mean the aggregation names.

    ``conversation_mean`` (the paper's equation, where every model call is a conversation): a row's tokens weigh
    1 / (its tokens x number of rows), the mean over model calls of each call's token mean.
    ``token_mean`` (the reference code): every completion token weighs 1 / (all completion tokens of the step).
    ``rollout_mean``: a rollout's calls together weigh as much as one recall answer: 1 / (the rollout's tokens x
    number of rollouts and recall answers), grouping rows by ``TrainingRow.conversation``.
    ``total`` is the global denominator (tokens, rows or rollouts summed over all processes); computed locally when
    omitted. Returns the local denominator, so distributed callers can sum it across processes first.
    """
    if aggregation == "token_mean":
        local = float(sum(len(r.completion_ids) for r in rows))
        denominator = total if total is not None else local
        for row in rows:
            row.weight = 1.0 / denominator if denominator > 0 else 0.0
        return local
    if aggregation == "conversation_mean":
        local = float(sum(1 for r in rows if r.completion_ids))
        denominator = total if total is not None else local
        for row in rows:
            n = len(row.completion_ids)
            row.weight = 1.0 / (n * denominator) if n > 0 and denominator > 0 else 0.0
        return local
    if aggregation == "rollout_mean":
        tokens_per_rollout: dict[int, int] = {}
        for row in rows:
            tokens_per_rollout[row.conversation] = tokens_per_rollout.get(row.conversation, 0) + len(
                row.completion_ids
            )
        local = float(sum(1 for n in tokens_per_rollout.values() if n > 0))
        denominator = total if total is not None else local
        for row in rows:
            n = tokens_per_rollout[row.conversation]
            row.weight = 1.0 / (n * denominator) if n > 0 and denominator > 0 else 0.0
        return local
    raise ValueError(f"loss aggregation must be one of {', '.join(LOSS_AGGREGATIONS)}, got {aggregation!r}.")


def pack_micro_batches(rows: list[TrainingRow], max_tokens: int) -> list[list[TrainingRow]]:
    """Group rows into micro-batches whose padded size (rows x longest row) stays within ``max_tokens``.

    Rows are sorted by length so similar lengths share a batch (little padding). A row longer than the budget gets
    a micro-batch of its own rather than being cut: cutting would change the context it is scored on.
    """
    batches: list[list[TrainingRow]] = []
    current: list[TrainingRow] = []
    longest = 0
    for row in sorted(rows, key=lambda r: r.num_tokens):
        new_longest = max(longest, row.num_tokens)
        if current and new_longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_longest = [], row.num_tokens
        current.append(row)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def collate_rows(rows: list[TrainingRow], pad_token_id: int, device: torch.device | str = "cpu") -> dict:
    """TRL's layout: prompts left-padded, completions right-padded, so the last ``C`` positions hold completions."""
    prompt_len = max(len(r.prompt_ids) for r in rows)
    completion_len = max(max(len(r.completion_ids) for r in rows), 1)
    n = len(rows)
    prompt_ids = torch.full((n, prompt_len), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, prompt_len), dtype=torch.long)
    completion_ids = torch.full((n, completion_len), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((n, completion_len), dtype=torch.long)
    old_logps = torch.zeros((n, completion_len), dtype=torch.float32)
    # Rows without sampling log-probs (dummy rows) get NaN: a zero log-ratio, so no correction, as TRL treats NaN.
    sampling_logps = torch.full((n, completion_len), math.nan, dtype=torch.float32)
    for i, row in enumerate(rows):
        p, c = len(row.prompt_ids), len(row.completion_ids)
        prompt_ids[i, prompt_len - p :] = torch.tensor(row.prompt_ids, dtype=torch.long)
        prompt_mask[i, prompt_len - p :] = 1
        if c:
            completion_ids[i, :c] = torch.tensor(row.completion_ids, dtype=torch.long)
            completion_mask[i, :c] = 1
        if row.old_logps is not None and c:
            old_logps[i, :c] = torch.tensor(row.old_logps[:c], dtype=torch.float32)
        if row.sampling_logps is not None and c:  # None entries were made NaN by sampling_logps_of
            values = row.sampling_logps[:c]
            sampling_logps[i, : len(values)] = torch.tensor(values, dtype=torch.float32)
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([r.advantage for r in rows], dtype=torch.float32),
        "weights": torch.tensor([r.weight for r in rows], dtype=torch.float32),
    }
    if all(r.old_logps is not None for r in rows):
        batch["old_per_token_logps"] = old_logps
    if any(r.sampling_logps is not None for r in rows):
        batch["sampling_per_token_logps"] = sampling_logps
    return {k: v.to(device) for k, v in batch.items()}


def clipped_policy_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    ref_per_token_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token PPO-clip loss (+ beta x the k3 KL estimate to the reference). Returns (loss, kl).

    ``importance_weights`` ((B, T) or (B, 1), from :func:`vllm_importance_weights`) multiply the policy term
    only, before the KL term is added, as TRL 1.16 does.
    """
    ratio = torch.exp(per_token_logps - old_per_token_logps)
    advantages = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    if importance_weights is not None:
        loss = loss * importance_weights
    kl = None
    if ref_per_token_logps is not None:
        delta = ref_per_token_logps - per_token_logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return loss, kl


VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def vllm_importance_weights(
    old_per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
) -> torch.Tensor:
    """TRL 1.16's vLLM importance-sampling ratio pi_old / pi_sampler, per token (B, T) or per sequence (B, 1).

    The log-ratio ``old - sampling`` is zeroed on padding and where the sampler gave no log-prob (NaN); sequence
    modes sum it over the completion. ``*_truncate`` clamps the ratio to [clip_min, clip_max]; ``*_mask`` sets
    ratios outside that range to 0 (the token or sequence is dropped from the loss). A None bound is open.
    """
    if mode not in VLLM_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {', '.join(VLLM_IS_MODES)}, got {mode!r}.")
    diff = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
