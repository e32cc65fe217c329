"""MemTrainer's engine glue (memtrain.trainer_engine): TRL's generation, launchers, fp32 reduction, optimizer guard."""

from __future__ import annotations

import pytest
import torch
from test_trainer import AGENT, answer_length_reward, entity_tools, make_trainer

from memtrain.configs import MemTrainConfig
from memtrain.trainer import MemTrainer
from memtrain.trainer_engine import TrainerGenerator


def test_trainer_generator_makes_one_call_per_agent_step(tiny_model, tokenizer, documents, tmp_path):
    trainer = make_trainer(tiny_model, tokenizer, documents, tmp_path)
    trajectories = trainer.memory_agent.rollout(documents["context"][:2], documents["prompt"][:2], n=2)
    steps = max(len(t.calls) for t in trajectories)
    assert isinstance(trainer.generator, TrainerGenerator)
    assert trainer.generator.calls == steps
    for trajectory in trajectories:
        assert all(len(c.completion_ids) <= AGENT.max_memory_tokens for c in trajectory.calls if c.kind == "update")


def test_a_step_whose_groups_are_all_filtered_leaves_the_weights_alone(tiny_model, tokenizer, documents, tmp_path):
    def constant_reward(completions, **kwargs):
        return [1.0] * len(completions)

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer = make_trainer(
        tiny_model, tokenizer, documents, tmp_path, max_steps=1, weight_decay=0.1, train_recall_answers=False,
        reward_funcs=["constant_reward"], reward_weights=[1.0], filter_zero_variance_groups=True,
        funcs=[constant_reward],
    )  # fmt: skip
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert log["groups_filtered"] == 1 and log["rows_trained"] == 0 and log["skipped_steps"] == 1


def test_a_filtered_micro_step_does_not_skip_the_accumulated_update(tiny_model, tokenizer, documents, tmp_path):
    """Gradient accumulation 2: an all-filtered first micro-step, a learning second one: the update happens."""
    calls = []

    def constant_then_length_reward(completions, **kwargs):
        calls.append(len(completions))
        return [1.0 if len(calls) == 1 else len(text) + i for i, text in enumerate(completions)]

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer = make_trainer(
        tiny_model, tokenizer, documents, tmp_path, max_steps=1, gradient_accumulation_steps=2,
        steps_per_generation=1, train_recall_answers=False, reward_funcs=["constant_then_length_reward"],
        reward_weights=[1.0], filter_zero_variance_groups=True, funcs=[constant_then_length_reward],
        trajectory_html_steps=0, save_strategy="no",
    )  # fmt: skip
    trainer.train()
    assert len(calls) == 2 and trainer.state.global_step == 1
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert log["skipped_steps"] == 0.5  # the first micro-step had nothing to learn, the second had rows
    assert any(not torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_deepspeed_is_refused_before_the_model_loads(tiny_model, tokenizer, documents, tmp_path, monkeypatch):
    args = MemTrainConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, num_generations=2,
                          use_cpu=True, report_to="none")  # fmt: skip
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch --config_file zero3.yaml` sets
    with pytest.raises(ValueError, match="DeepSpeed"):
        MemTrainer.check_launcher()  # train.py's check, before the recipe is parsed
    with pytest.raises(ValueError, match=r"DeepSpeed.*fsdp\.yaml"):
        MemTrainer(model=tiny_model, args=args, agent_config=AGENT, train_dataset=documents, processing_class=tokenizer,
                   entity_tools=entity_tools(), reward_funcs=[answer_length_reward])  # fmt: skip
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    MemTrainer.check_launcher(args)  # DDP / FSDP / one process: accepted
    with pytest.raises(ValueError, match="DeepSpeed"):
        MemTrainer.check_launcher(args, deepspeed_enabled=True)  # a plugin passed in code


def test_fsdp2_under_bf16_reduces_gradients_in_fp32():
    """Accelerate's FSDP2 plugin under mixed_precision bf16 reduces in bf16; MemTrainer switches that to fp32."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does for `mixed_precision: bf16`
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16
    policy = MemTrainer._fp32_reduce_policy(plugin)
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32,
                                                                              torch.bfloat16)  # fmt: skip
    full = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert MemTrainer._fp32_reduce_policy(full) is None  # no mixed precision: parameters' own dtype
    full.set_mixed_precision("fp32")
    assert MemTrainer._fp32_reduce_policy(full) is None
    assert MemTrainer._fp32_reduce_policy(None) is None
