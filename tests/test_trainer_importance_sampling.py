"""TRL's vLLM importance-sampling correction in MemTrainer's loss, and the GRPOConfig options MemTrainer refuses.

A row's tokens carry the log-probs vLLM sampled them with; the loss multiplies each token's policy term by TRL's
ratio pi_old / pi_vLLM (clipped or masked, per token or per sequence). Here the sampling log-probs are the policy's
own minus known offsets, so every ratio and the whole micro-batch loss are numbers computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig

from memtrain.configs import MemTrainConfig
from memtrain.grpo import TrainingRow
from memtrain.preflight import PreflightError, check_grpo_options
from memtrain.trainer import MemTrainer


DOCS = Dataset.from_list([{"prompt": "Which entity?", "context": "Quito.", "answers": ["Quito"]}] * 2)
# log(pi_old / pi_vLLM) per token of each row; row A's sequence sum is -1.2, row B's 0.3.
DIFFS = [[0.5, -0.2, -1.5], [0.1, 0.2]]
ADVANTAGES, WEIGHTS = [1.0, -2.0], [0.1, 0.3]
E = math.exp
# TRL's weights with clip_min 0.5, clip_max 1.5, by hand: truncate clamps, mask zeroes what falls outside.
HAND = {
    "token_truncate": [[1.5, E(-0.2), 0.5], [E(0.1), E(0.2)]],
    "token_mask": [[0.0, E(-0.2), 0.0], [E(0.1), E(0.2)]],
    "sequence_truncate": [[0.5] * 3, [E(0.3)] * 2],
    "sequence_mask": [[0.0] * 3, [E(0.3)] * 2],
}


def make_trainer(model, tokenizer, tmp_path, **overrides) -> MemTrainer:
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, num_generations=2, max_steps=1,
        report_to="none", use_cpu=True, bf16=False, seed=0, beta=0.0, warmup_steps=0, trajectory_html_steps=0,
    )  # fmt: skip
    settings.update(overrides)
    return MemTrainer(model=model, args=MemTrainConfig(**settings), processing_class=tokenizer, train_dataset=DOCS)


def rows_with_sampling_offsets(trainer: MemTrainer, tokenizer) -> list[TrainingRow]:
    prompt = tokenizer("The old port of Quito trades spices.")["input_ids"]
    completions = [tokenizer(" one two three")["input_ids"][:3], tokenizer(" four five")["input_ids"][:2]]
    rows = [
        TrainingRow(prompt, completion, advantage, "update", k, weight=weight)
        for k, (completion, advantage, weight) in enumerate(zip(completions, ADVANTAGES, WEIGHTS))
    ]
    for row, policy, diffs in zip(rows, trainer.compute_row_logps(rows), DIFFS):
        row.sampling_logps = [p - d for p, d in zip(policy, diffs)]  # old - sampling = d (old = the policy now)
    return rows


def use_vllm_correction(trainer: MemTrainer, mode: str) -> None:
    """As a use_vllm trainer is configured by TRL (no engine needed: the loss reads the rows' log-probs only)."""
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = 0.5, 1.5


@pytest.fixture
def trainer(tiny_model, tokenizer, tmp_path) -> MemTrainer:
    trainer = make_trainer(tiny_model, tokenizer, tmp_path)
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("mode", list(HAND))
def test_each_mode_scales_the_loss_by_trls_ratio(trainer, tokenizer, mode):
    rows = rows_with_sampling_offsets(trainer, tokenizer)
    use_vllm_correction(trainer, mode)
    loss = trainer._micro_batch_loss(trainer.model, rows, "train")
    # Single iteration: pi / pi_old = 1, so each token's policy term is -advantage x its IS weight x row weight.
    want = sum(-a * w * sum(hand) for a, w, hand in zip(ADVANTAGES, WEIGHTS, HAND[mode]))
    assert loss.item() == pytest.approx(want, rel=1e-4)
    plain = sum(-a * w * len(d) for a, w, d in zip(ADVANTAGES, WEIGHTS, DIFFS))  # 0.9
    assert abs(want - plain) > 0.1  # the correction changes this loss


@pytest.mark.parametrize("mode", list(HAND))
def test_the_weight_is_a_constant_in_the_gradient(trainer, tokenizer, mode):
    """The IS weight is built from the detached old log-probs: the gradient is TRL's, -A x w x weight x d log-prob.

    At one iteration a weight built from the live log-probs gives the same loss value, but the gradient then also
    flows through the weight; so the gradient is compared with that of the surrogate whose weights are constants.
    """
    rows = rows_with_sampling_offsets(trainer, tokenizer)
    use_vllm_correction(trainer, mode)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer._micro_batch_loss(trainer.model, rows, "train")
    got = torch.autograd.grad(loss, params, allow_unused=True)

    logps, _ = trainer._row_logps(trainer.model, rows)
    coefficients = torch.zeros_like(logps)
    for i, (a, w, hand) in enumerate(zip(ADVANTAGES, WEIGHTS, HAND[mode])):
        coefficients[i, : len(hand)] = torch.tensor([-a * w * h for h in hand])
    want = torch.autograd.grad((coefficients * logps).sum(), params, allow_unused=True)

    pairs = [(g, x) for g, x in zip(got, want) if x is not None]
    assert pairs and all(g is not None for g, _ in pairs)
    assert sum(float(x.abs().sum()) for _, x in pairs) > 1e-3  # a gradient to compare
    for g, x in pairs:
        torch.testing.assert_close(g, x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "mode, ratios",
    [
        ("token_truncate", [1.5, E(-0.2), 0.5, E(0.1), E(0.2)]),  # over completion tokens
        ("sequence_mask", [0.0, E(0.3)]),  # over sequences
    ],
)
def test_sampling_metrics_have_trls_names_and_values(trainer, tokenizer, mode, ratios):
    rows = rows_with_sampling_offsets(trainer, tokenizer)
    use_vllm_correction(trainer, mode)
    half = [rows[0]], [rows[1]]  # two micro-batches of one step: the metrics cover both
    for micro in half:
        trainer._micro_batch_loss(trainer.model, micro, "train")
    trainer._log_loss_metrics("train")
    metrics = trainer._metrics["train"]
    flat = [abs(d) for diffs in DIFFS for d in diffs]
    assert metrics["sampling/sampling_logp_difference/mean"] == [pytest.approx(sum(flat) / len(flat), abs=1e-4)]
    assert metrics["sampling/sampling_logp_difference/max"] == [pytest.approx(1.5, abs=1e-4)]
    assert metrics["sampling/importance_sampling_ratio/min"] == [pytest.approx(min(ratios), abs=1e-4)]
    assert metrics["sampling/importance_sampling_ratio/mean"] == [pytest.approx(sum(ratios) / len(ratios), abs=1e-4)]
    assert metrics["sampling/importance_sampling_ratio/max"] == [pytest.approx(max(ratios), abs=1e-4)]


@pytest.mark.parametrize("setting", ["no_vllm", "correction_off"])
def test_no_correction_without_vllm_or_with_the_option_off(trainer, tokenizer, setting):
    rows = rows_with_sampling_offsets(trainer, tokenizer)
    use_vllm_correction(trainer, "token_truncate")
    if setting == "no_vllm":
        trainer.use_vllm = False
    else:
        trainer.vllm_importance_sampling_correction = False
    loss = trainer._micro_batch_loss(trainer.model, rows, "train")
    assert loss.item() == pytest.approx(sum(-a * w * len(d) for a, w, d in zip(ADVANTAGES, WEIGHTS, DIFFS)), rel=1e-4)
    trainer._log_loss_metrics("train")
    assert not any(key.startswith("sampling/") for key in trainer._metrics["train"])


# ---------------------------------------------------------------------------------------------- refused options
REFUSED = {
    "loss_type": "grpo",
    "importance_sampling_level": "sequence",
    "mask_truncated_completions": True,
    "top_entropy_quantile": 0.2,
    "use_liger_kernel": True,
    "entropy_coef": 0.01,
    "use_adaptive_entropy": True,
    "off_policy_mask_threshold": 0.5,
    "delta": 2.0,
    "multi_objective_aggregation": "normalize_then_sum",
    "router_aux_loss_coef": 0.01,
    "chat_template_kwargs": {"enable_thinking": False},
    "max_tool_calling_iterations": 3,
}


@pytest.mark.parametrize("option", list(REFUSED))
def test_ignored_option_is_refused_before_the_model_loads(option, tmp_path):
    value = REFUSED[option]
    args = MemTrainConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{option: value})
    with pytest.raises(PreflightError) as error:
        MemTrainer(model=str(tmp_path / "no-such-model"), args=args)  # refused before loading it
    message = str(error.value)
    assert f"{option}={value!r}" in message and "remove" in message and "\n" not in message


def test_several_ignored_options_are_named_in_one_error(tmp_path):
    args = MemTrainConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, loss_type="bnpo", delta=1.5)
    with pytest.raises(PreflightError, match="loss_type='bnpo'.*loss_aggregation.*delta=1.5"):
        check_grpo_options(args)


def test_defaults_pass_and_construct(tiny_checkpoint, tokenizer, tmp_path):
    check_grpo_options(GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    args = MemTrainConfig(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    check_grpo_options(args)
    # The paper's defaults (beta 1e-3: a reference model, loaded from the checkpoint's path).
    trainer = MemTrainer(model=str(tiny_checkpoint), args=args, processing_class=tokenizer, train_dataset=DOCS)
    assert trainer.loss_type == "dapo" and not trainer.use_vllm
