"""MemTrainer's loss (memtrain.trainer_loss): rows scored on their own prompts, old and reference log-probs."""

from __future__ import annotations

import pytest
import torch
from test_trainer import AGENT, make_trainer

from memtrain.agent.generation import SamplingConfig, TransformersGenerator
from memtrain.agent.memory_agent import MemoryAgent
from memtrain.grpo import TrainingRow


def test_every_row_is_scored_on_its_own_prompt(tiny_model, tokenizer, documents, tmp_path):
    """Training-time log-probs of each call's completion = generation-time log-probs of that same completion."""
    generator = TransformersGenerator(tiny_model, tokenizer, SamplingConfig(temperature=1.0, seed=3))
    agent = MemoryAgent(tokenizer, generator, AGENT)
    trajectories = agent.rollout(documents["context"][:2], documents["prompt"][:2], n=2)
    rows, expected = [], []
    for i, trajectory in enumerate(trajectories):
        assert len(trajectory.calls) == trajectory.num_chunks + 1
        for call in trajectory.calls:
            rows.append(TrainingRow(call.prompt_ids, call.completion_ids, 1.0, call.kind, i))
            expected.append(call.logprobs)
    trainer = make_trainer(tiny_model, tokenizer, documents, tmp_path)
    computed = trainer.compute_row_logps(rows)
    for got, want, row in zip(computed, expected, rows):
        assert len(got) == len(row.completion_ids)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-4, rtol=0)


def test_kl_to_the_reference_model_is_a_loss_term_when_beta_is_set(tiny_checkpoint, tokenizer, documents, tmp_path):
    """Full fine-tuning with beta > 0: TRL's reference copy scores every row; the KL is logged (0 at step 1)."""
    trainer = make_trainer(str(tiny_checkpoint), tokenizer, documents, tmp_path, max_steps=1, beta=0.04)
    assert trainer.ref_model is not None
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert log["rows_trained"] > 0
    # before the first update the policy is the reference: the k3 estimate is 0 up to float error
    assert log["kl"] == pytest.approx(0.0, abs=1e-6)


def test_reused_generations_are_scored_against_their_old_log_probs(tiny_model, tokenizer, documents, tmp_path):
    """num_iterations = 2: the second update reuses the rollouts, so rows carry their generation-time log-probs."""
    trainer = make_trainer(tiny_model, tokenizer, documents, tmp_path, max_steps=2, num_iterations=2)
    trainer.train()
    rows = [row for shard in trainer._buffered_inputs for row in shard]
    assert rows and all(row.old_logps is not None and len(row.old_logps) == len(row.completion_ids) for row in rows)
    logs = [entry for entry in trainer.state.log_history if "clip_ratio/region_mean" in entry]
    assert len(logs) == 2
    # one rollout phase for the two updates
    assert len([entry for entry in trainer.state.log_history if "rollout_time" in entry]) == 1


def test_rows_scored_after_an_update_get_old_log_probs(tiny_model, tokenizer, documents, tmp_path):
    """steps_per_generation 2, gradient accumulation 3: a generation's second half is trained after a step."""
    trainer = make_trainer(
        tiny_model, tokenizer, documents, tmp_path, max_steps=1, gradient_accumulation_steps=3,
        steps_per_generation=2, trajectory_html_steps=0, save_strategy="no",
    )  # fmt: skip
    assert trainer._needs_old_logps()
    trainer.model.train()
    trainer._prepare_inputs([documents[i] for i in (0, 0, 1, 1)])  # a generation batch: 2 documents x G1
    rows = [row for shard in trainer._buffered_inputs for row in shard]
    assert rows and all(row.old_logps is not None and len(row.old_logps) == len(row.completion_ids) for row in rows)
    aligned = make_trainer(tiny_model, tokenizer, documents, tmp_path, gradient_accumulation_steps=2,
                           steps_per_generation=2)  # fmt: skip
    assert not aligned._needs_old_logps()  # one optimizer step consumes the whole generation


def test_rows_sharing_a_prompt_are_encoded_once_with_row_by_row_values(tiny_model, tokenizer, documents, tmp_path):
    """G rollouts of one document share their first memory update's prompt: the forward holds it once."""
    generator = TransformersGenerator(tiny_model, tokenizer, SamplingConfig(temperature=1.0, seed=3))
    trajectories = MemoryAgent(tokenizer, generator, AGENT).rollout(
        documents["context"][:1], documents["prompt"][:1], n=3
    )
    rows = [
        TrainingRow(c.prompt_ids, c.completion_ids, 1.0, c.kind, i)
        for i, t in enumerate(trajectories)
        for c in t.calls
    ]
    first = [row for row in rows if row.prompt_ids == rows[0].prompt_ids]
    assert len(first) == 3  # the three rollouts' first updates
    trainer = make_trainer(tiny_model, tokenizer, documents, tmp_path, max_tokens_per_microbatch=100_000)
    seen: list[tuple[int, ...]] = []
    hook = trainer.model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                                   with_kwargs=True)  # fmt: skip
    shared = trainer.compute_row_logps(rows)
    trainer.args.share_prompts = False
    one_by_one = trainer.compute_row_logps(rows)
    hook.remove()
    for got, want in zip(shared, one_by_one, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
    assert len(seen) == 2  # one micro-batch each
    assert seen[1][0] == len(rows) and seen[0][0] == len(rows) - 2  # one sequence per distinct prompt
    assert seen[0].numel() < seen[1].numel()
