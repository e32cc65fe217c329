"""The run_grpo path end to end: recipe -> local model + LoRA -> built documents -> one step -> adapter pushed with a card."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_built_documents
from datasets import Dataset
from test_hub import FakeHubServer

from memtrain.rewards import register_reward
from memtrain.train import load_training_dataset, main


@register_reward("answer_length")
def answer_length(completions, **kwargs):
    """A reward with spread even on a random model (test only): the final answer's length."""
    return [len(text) / 10 for text in completions]


@pytest.fixture
def built_documents(tmp_path) -> Path:
    return save_built_documents(tmp_path / "docs", num_documents=2, corpus_limit=200, seed=1)


def test_recipe_trains_a_lora_adapter_and_pushes_it_with_a_card(
    tiny_checkpoint, built_documents, tmp_path, monkeypatch
):
    hub = FakeHubServer(monkeypatch)
    output_dir = tmp_path / "run"
    recipe = {
        "model_name_or_path": str(tiny_checkpoint),
        "dtype": "float32",
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "dataset_name": str(built_documents),
        "chunk_size": 48,
        "max_chunks": 2,
        "max_memory_tokens": 6,
        "max_answer_tokens": 4,
        "reward_funcs": ["masked_entity_em_lenient", "memory_recall"],
        "reward_weights": [1.0, 0.5],
        "lenient_recall": True,
        "num_generations": 2,
        "per_device_train_batch_size": 2,
        "recall_samples": 2,
        "beta": 0.001,
        "max_steps": 1,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "trajectory_html_steps": 0,
        "output_dir": str(output_dir),
        "push_to_hub": True,
        "hub_model_id": "me/memtrain-tiny",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")

    metrics = main([str(path), "--learning_rate", "1e-3"])

    assert "train_runtime" in metrics
    assert (output_dir / "adapter_config.json").is_file() and (output_dir / "memtrain_recipe.yaml").is_file()
    saved = yaml.safe_load((output_dir / "memtrain_recipe.yaml").read_text())
    assert saved["lora_r"] == 4 and saved["command_line_overrides"] == "--learning_rate 1e-3"
    assert hub.repos[0]["repo_id"] == "me/memtrain-tiny"
    pushed = hub.commits[-1]["files"]
    assert "adapter_model.safetensors" in pushed and "README.md" in pushed
    card = pushed["README.md"].decode()
    assert "memtrain" in card and "masked_entity_em_lenient" in card

    # The trained adapter, named as the model, keeps training: its LoRA weights change, the base does not.
    from safetensors.torch import load_file

    first = load_file(output_dir / "adapter_model.safetensors")
    again = {**recipe, "model_name_or_path": str(output_dir), "use_peft": False, "push_to_hub": False}
    again["output_dir"] = str(tmp_path / "continued")
    path.write_text(yaml.safe_dump(again), encoding="utf-8")
    main([str(path), "--learning_rate", "1e-2", "--reward_funcs", "answer_length", "memory_recall"])
    second = load_file(tmp_path / "continued" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        load_training_dataset(str(tmp_path / "missing.parquet"))
    Dataset.from_list([{"prompt": "p", "text": "t"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['context', 'answers'\]"):
        load_training_dataset(str(tmp_path / "bad"))
