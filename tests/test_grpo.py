"""Multi-conversation GRPO arithmetic, checked against numbers computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

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


def test_advantages_are_centred_within_each_group():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5 -> +0.5, -0.5, -0.5, +0.5
    # group 1: rewards 1.5, 0.5, 0.5, 0.5 -> mean 0.75 -> +0.75, -0.25, -0.25, -0.25
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.5, 0.5, 0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    out = group_advantages(rewards, groups, scale_rewards="none")
    assert out.advantages.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.75, -0.25, -0.25, -0.25])
    assert out.keep.all() and out.num_groups == 2 and out.num_filtered_groups == 0


def test_group_scaling_divides_by_the_unbiased_group_std():
    # rewards 1, 0, 0, 1: centred +-0.5, unbiased variance = 4 * 0.25 / 3 = 1/3, std = 0.57735
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    out = group_advantages(rewards, torch.zeros(4, dtype=torch.long), scale_rewards="group")
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert out.advantages.tolist() == pytest.approx([expected, -expected, -expected, expected], rel=1e-6)


def test_batch_scaling_uses_the_std_over_all_rewards():
    # rewards 2, 0 | 1, 1: group means 1 and 1 -> centred +1, -1, 0, 0; batch std of [2, 0, 1, 1] = sqrt(2/3)
    rewards = torch.tensor([2.0, 0.0, 1.0, 1.0])
    out = group_advantages(rewards, torch.tensor([0, 0, 1, 1]), scale_rewards="batch")
    s = math.sqrt(2 / 3) + 1e-4
    assert out.advantages.tolist() == pytest.approx([1 / s, -1 / s, 0.0, 0.0], rel=1e-6)


def test_zero_variance_groups_are_filtered_only_when_asked():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    kept = group_advantages(rewards, groups, filter_zero_variance=True)
    assert kept.keep.tolist() == [False, False, True, True, False, False]
    assert kept.num_filtered_groups == 2
    unfiltered = group_advantages(rewards, groups, filter_zero_variance=False)
    assert unfiltered.keep.all() and unfiltered.num_filtered_groups == 0


def test_nan_rewards_count_as_zero():
    out = group_advantages(torch.tensor([math.nan, 1.0]), torch.tensor([0, 0]))
    assert out.advantages.tolist() == pytest.approx([-0.5, 0.5])


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.tensor([1.0]), torch.tensor([0]), scale_rewards="std")


def _row(prompt_len: int, completion_len: int, conversation: int, advantage: float = 1.0) -> TrainingRow:
    return TrainingRow(
        list(range(1, prompt_len + 1)), list(range(100, 100 + completion_len)), advantage, "update", conversation
    )


def test_token_mean_weights_every_completion_token_equally():
    rows = [_row(5, 3, 0), _row(5, 1, 0), _row(5, 4, 1)]  # 8 completion tokens
    local = assign_loss_weights(rows, "token_mean")
    assert local == 8
    assert [r.weight for r in rows] == pytest.approx([1 / 8] * 3)
    # With a global denominator (tokens summed over processes) the local one is replaced.
    assign_loss_weights(rows, "token_mean", total=16)
    assert [r.weight for r in rows] == pytest.approx([1 / 16] * 3)


def test_conversation_mean_averages_per_model_call_first():
    """The paper's equation: every model call (row) is a conversation; 3 rows -> each row's tokens sum to 1/3."""
    rows = [_row(5, 3, 0), _row(5, 1, 0), _row(5, 4, 1)]
    local = assign_loss_weights(rows, "conversation_mean")
    assert local == 3
    assert [r.weight for r in rows] == pytest.approx([1 / 9, 1 / 3, 1 / 12])
    assert [r.weight * len(r.completion_ids) for r in rows] == pytest.approx([1 / 3] * 3)
    assign_loss_weights(rows, "conversation_mean", total=6)
    assert [r.weight * len(r.completion_ids) for r in rows] == pytest.approx([1 / 6] * 3)


def test_rollout_mean_averages_per_rollout_first():
    # rollout 0 has 3 + 1 = 4 tokens, rollout 1 has 4: each token weighs 1 / (tokens of its rollout x 2)
    rows = [_row(5, 3, 0), _row(5, 1, 0), _row(5, 4, 1)]
    local = assign_loss_weights(rows, "rollout_mean")
    assert local == 2
    assert [r.weight for r in rows] == pytest.approx([1 / 8, 1 / 8, 1 / 8])
    rows = [_row(5, 2, 0), _row(5, 6, 1)]
    assign_loss_weights(rows, "rollout_mean")
    # a per-token loss of 1 everywhere gives (2 x 1/4 + 6 x 1/12) = 1: the mean of two rollout means of 1.
    assert [r.weight for r in rows] == pytest.approx([1 / 4, 1 / 12])
    assert sum(r.weight * len(r.completion_ids) for r in rows) == pytest.approx(1.0)


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="conversation_mean, token_mean, rollout_mean"):
        assign_loss_weights([_row(1, 1, 0)], "sequence_mean")


def test_packing_respects_the_token_budget_and_keeps_every_row():
    rows = [_row(10, 5, i) for i in range(6)] + [_row(40, 10, 9)]  # lengths 15 x 6 and 50
    batches = pack_micro_batches(rows, max_tokens=60)
    assert sorted(id(r) for b in batches for r in b) == sorted(id(r) for r in rows)
    for batch in batches:
        assert max(r.num_tokens for r in batch) * len(batch) <= 60
    # A row over the budget is never cut: it gets a micro-batch of its own.
    alone = pack_micro_batches([_row(100, 20, 0), _row(3, 1, 1)], max_tokens=50)
    assert [len(b) for b in alone] == [1, 1]
    assert alone[1][0].num_tokens == 120


def test_collate_left_pads_prompts_and_right_pads_completions():
    rows = [_row(3, 2, 0, advantage=0.5), _row(1, 3, 1, advantage=-1.0)]
    assign_loss_weights(rows, "token_mean")
    batch = collate_rows(rows, pad_token_id=0)
    assert batch["prompt_ids"].tolist() == [[1, 2, 3], [0, 0, 1]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["completion_ids"].tolist() == [[100, 101, 0], [100, 101, 102]]
    # The loss mask covers generated tokens only: never the prompt, never padding.
    assert batch["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["advantages"].tolist() == [0.5, -1.0]
    assert batch["weights"].tolist() == pytest.approx([0.2, 0.2])


def test_clipped_loss_matches_hand_computation():
    # ratio = exp(0.5) = 1.6487 with advantage +1: clipped at 1.2 -> loss -1.2
    # ratio = exp(-0.5) = 0.6065 with advantage -1: min(-0.6065, -0.8) = -0.8 -> loss +0.8
    # ratio 1 with advantage 2: loss -2
    logps = torch.tensor([[0.0, 0.0, 0.0]])
    old = torch.tensor([[-0.5, 0.5, 0.0]])
    per_token = torch.stack(
        [
            clipped_policy_loss(logps[:, i : i + 1], old[:, i : i + 1], torch.tensor([a]), 0.2, 0.2)[0]
            for i, a in enumerate([1.0, -1.0, 2.0])
        ]
    ).flatten()
    assert per_token.tolist() == pytest.approx([-1.2, 0.8, -2.0], rel=1e-5)


def test_kl_term_is_the_k3_estimator():
    # ref - logp = -0.1: k3 = exp(-0.1) + 0.1 - 1 = 0.0048374
    logps = torch.tensor([[0.0]])
    loss, kl = clipped_policy_loss(logps, logps, torch.tensor([0.0]), 0.2, 0.2, torch.tensor([[-0.1]]), beta=0.5)
    assert kl.item() == pytest.approx(math.exp(-0.1) + 0.1 - 1, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * kl.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- vLLM importance sampling
# Two rows: log(pi_old / pi_vLLM) per token = [0.5, -0.2, -1.5] (sequence sum -1.2) and [0.1, 0.2, pad]
# (sequence 0.3). exp: 1.64872, 0.81873, 0.22313 | 1.10517, 1.22140 | sequences exp(-1.2) = 0.30119, exp(0.3) = 1.34986.
IS_OLD = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
IS_SAMPLING = torch.tensor([[-0.5, 0.2, 1.5], [-0.1, -0.2, 7.0]])  # 7.0 sits on padding: ignored
IS_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        # clamp to [0.5, 1.5]
        ("token_truncate", [[1.5, 0.81873, 0.5], [1.10517, 1.22140, 1.0]]),
        # outside [0.5, 1.5] -> 0
        ("token_mask", [[0.0, 0.81873, 0.0], [1.10517, 1.22140, 1.0]]),
        ("sequence_truncate", [[0.5], [1.34986]]),
        ("sequence_mask", [[0.0], [1.34986]]),
    ],
)
def test_vllm_importance_weights_match_hand_computation(mode, expected):
    weights = vllm_importance_weights(IS_OLD, IS_SAMPLING, IS_MASK, mode, clip_min=0.5, clip_max=1.5)
    assert weights.tolist() == [pytest.approx(row, rel=1e-4) for row in expected]


def test_vllm_importance_weights_open_bounds_and_missing_logprobs():
    # TRL's default: clip_min None, clip_max 3.0. A NaN sampling log-prob (vLLM gave none) is no correction (ratio 1).
    sampling = torch.tensor([[-2.0, math.nan]])
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    truncated = vllm_importance_weights(old, sampling, mask, "token_truncate", None, 3.0)
    assert truncated.tolist() == [pytest.approx([3.0, 1.0])]
    masked = vllm_importance_weights(old, sampling, mask, "token_mask", None, 3.0)
    assert masked.tolist() == [pytest.approx([0.0, 1.0])]
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        vllm_importance_weights(old, sampling, mask, "token", None, 3.0)


def test_importance_weights_scale_the_policy_term_not_the_kl():
    # advantage 1, ratio 1: policy term -1; x IS weight 0.25 -> -0.25; + beta x k3(-0.1) unchanged.
    logps = torch.tensor([[0.0]])
    loss, kl = clipped_policy_loss(
        logps, logps, torch.tensor([1.0]), 0.2, 0.2, torch.tensor([[-0.1]]), 0.5, torch.tensor([[0.25]])
    )
    assert loss.item() == pytest.approx(-0.25 + 0.5 * (math.exp(-0.1) + 0.1 - 1), rel=1e-5)


def test_collate_carries_sampling_logprobs_with_nan_for_rows_without_them():
    rows = [_row(1, 2, 0), _row(1, 3, 1)]
    rows[0].sampling_logps = [-0.5, -1.0]
    batch = collate_rows(rows, pad_token_id=0)
    sampling = batch["sampling_per_token_logps"]
    assert sampling[0, :2].tolist() == [-0.5, -1.0] and torch.isnan(sampling[0, 2])
    assert torch.isnan(sampling[1]).all()
    assert "sampling_per_token_logps" not in collate_rows([_row(1, 2, 0)], pad_token_id=0)


def test_sampling_logps_of_a_call():
    assert sampling_logps_of(None, 3) is None
    values = sampling_logps_of([-0.1, None, -0.3, -0.4], 3)  # vLLM's None (NaN) kept as NaN; cut to the completion
    assert values[0] == -0.1 and math.isnan(values[1]) and values[2] == -0.3 and len(values) == 3
