"""MemTrainer's logging (memtrain.trainer_logging): TRL's completions table of a step's rollouts."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_trainer import answer_length_reward, make_trainer


def test_log_completions_records_each_rollouts_problem_memories_answer_rewards(
    tiny_model, tokenizer, documents, tmp_path, capsys
):
    """TRL's completions table (printed, saved under completions/) with one row per rollout of the step."""
    import pandas as pd

    trainer = make_trainer(
        tiny_model, tokenizer, documents, tmp_path, max_steps=1, log_completions=True, num_completions_to_print=1,
        trajectory_html_steps=0, save_strategy="no",
    )  # fmt: skip
    trainer.train()
    tables = sorted((Path(trainer.args.output_dir) / "completions").glob("*.parquet"))
    assert [t.name for t in tables] == ["completions_00001.parquet"]
    table = pd.read_parquet(tables[0])
    expected = ["step", "prompt", "completion", "answer_length_reward", "memory_recall", "memories", "doc_id"]
    assert list(table.columns) == [*expected, "advantage"]
    trajectories = trainer._last_trajectories
    assert len(table) == len(trajectories) == 2  # one document x num_generations rollouts
    for (_, row), trajectory in zip(table.iterrows(), trajectories, strict=True):
        assert row["prompt"] == trajectory.problem and row["completion"] == trajectory.answer
        assert len(trajectory.memories) > 1  # the initial memory, then one per chunk read
        for t, memory in enumerate(trajectory.memories[1:], start=1):
            assert f"[{t}] {memory}" in row["memories"]
    # advantages are centred within the document's group; rewards are the functions' own values
    assert table["advantage"].sum() == pytest.approx(0.0, abs=1e-6)
    answers = [t.answer for t in trajectories]
    assert table["answer_length_reward"].tolist() == pytest.approx(answer_length_reward(completions=answers))
    assert "Step 1" in capsys.readouterr().out  # rich printed num_completions_to_print rows
