"""The demo pipeline end to end on a tiny model: documents -> evaluate -> warm start + GRPO -> evaluate -> report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import save_built_documents
from datasets import Dataset

from memtrain.data.build import split_held_out
from memtrain.demo import DemoArguments, run_demo
from memtrain.evaluation.held_out import per_document
from memtrain.plots import save_reward_curves


@pytest.fixture
def documents(tmp_path) -> Path:
    return save_built_documents(tmp_path / "documents", num_documents=5, corpus_limit=300, seed=2)


def test_held_out_rows_are_the_last_ones_and_bad_sizes_are_refused():
    rows = Dataset.from_list([{"i": i} for i in range(5)])
    train, held_out = split_held_out(rows, 2)
    assert train["i"] == [0, 1, 2] and held_out["i"] == [3, 4]
    with pytest.raises(ValueError, match="0 < held-out documents < 5"):
        split_held_out(rows, 5)


def test_demo_evaluates_trains_and_reports(tiny_checkpoint, documents, tmp_path):
    recipe = {
        "model_name_or_path": str(tiny_checkpoint),
        "dtype": "float32",
        "dataset_name": "set by the demo",
        "chunk_size": 48,
        "max_chunks": 2,
        "max_memory_tokens": 8,
        "max_answer_tokens": 4,
        "warm_start_examples": 4,
        "reward_funcs": ["answer_f1_lenient", "memory_recall"],
        "reward_weights": [1.0, 0.5],
        "recall_metric": "f1",
        "lenient_recall": True,
        "recall_chunk_policy": "latest",
        "num_generations": 2,
        "per_device_train_batch_size": 2,
        "recall_samples": 2,
        "temperature": 0.7,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "logging_steps": 1,
        "output_dir": str(tmp_path / "unused"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "demo"

    report = run_demo(
        DemoArguments(
            recipe=str(path), data_recipe="unused: the documents exist", dataset=str(documents),
            output_dir=str(out), held_out=2, steps=1, recall_samples=2,
        )
    )  # fmt: skip

    text = report.read_text()
    assert "| after |" in text and f"| {tiny_checkpoint} (before) |" in text
    assert (out / "model" / "warm_start_losses.json").is_file()
    assert len(json.loads((out / "model" / "warm_start_losses.json").read_text())) == 1  # 4 examples, batch 8
    assert (out / "report" / "reward_curves.png").stat().st_size > 0
    results = json.loads((out / "report" / "eval" / "results.json").read_text())
    assert [run["label"] for run in results["runs"]] == [f"{tiny_checkpoint} (before)", "after"]
    for run in results["runs"]:
        assert len(per_document(run, "recall_f1")) == 2
        assert run["settings"]["temperature"] == 0.7 and run["settings"]["recall_chunk_policy"] == "latest"
    pages = list((out / "report" / "eval" / "trajectories").glob("*.html")) + list((out / "model").glob("**/*.html"))
    assert pages and all(page.name in text for page in pages)


def test_reward_curves_need_logged_steps(tmp_path):
    assert save_reward_curves([{"train_runtime": 1.0}], tmp_path / "c.png") is None
    history = [{"step": 1, "reward": 0.1, "recall_accuracy": 0.0}, {"step": 2, "reward": 0.3, "recall_accuracy": 0.2}]
    assert save_reward_curves(history, tmp_path / "c.png").stat().st_size > 0
