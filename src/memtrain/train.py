"""The GRPO entry point behind ``scripts/run_grpo.py``: recipe -> model + data -> MemTrainer -> checkpoints, Hub.

Kept here rather than in the script so the whole path is importable and tested.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import datasets
import yaml
from datasets import Dataset, load_dataset, load_from_disk
from transformers.trainer_utils import get_last_checkpoint

from memtrain.agent.memory_agent import AgentConfig
from memtrain.configs import MemTrainConfig, MemTrainScriptArguments, load_recipe, parse_recipe_args


logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt", "context", "answers")
_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def load_training_dataset(name: str, config: str | None = None, split: str = "train") -> Dataset:
    """A dataset from a ``save_to_disk`` folder, a parquet/json(l)/csv file, or the Hub, checked for the contract."""
    path = Path(name)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            loaded = load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{path} has splits {list(loaded)}, not {split!r}; set dataset_train_split.")
                loaded = loaded[split]
        else:
            loaded = load_dataset(str(path), config, split=split)
    elif path.suffix in _FILE_BUILDERS and path.exists():
        loaded = load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    elif path.suffix in _FILE_BUILDERS or name.startswith((".", "/")):
        raise FileNotFoundError(f"Dataset file {name} does not exist.")
    else:
        loaded = load_dataset(name, config, split=split)
    missing = [column for column in REQUIRED_COLUMNS if column not in loaded.column_names]
    if missing:
        raise ValueError(
            f"Dataset {name} lacks column(s) {missing}; memtrain rows need {list(REQUIRED_COLUMNS)} "
            f"(it has {loaded.column_names}). Build MemTrain documents with scripts/build_dataset.py."
        )
    return loaded


def train(
    script_args: MemTrainScriptArguments,
    agent_config: AgentConfig,
    training_args: MemTrainConfig,
    model_args: Any,
    recipe: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Run MemTrain GRPO; returns the final training metrics."""
    from trl import get_peft_config

    from memtrain.models import load_from_model_config
    from memtrain.trainer import MemTrainer

    if script_args.dataset_name is None:
        raise ValueError("Set `dataset_name:` in the recipe (a built dataset folder, a file, or a Hub dataset id).")
    train_dataset = load_training_dataset(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split
    )
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))

    # memtrain pushes once, at the end, with its own card (adapter or full weights); Trainer's own pushes (a repo at
    # start, every checkpoint, its generic card) are switched off so the Hub never holds a card-less checkpoint.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False

    # A published memtrain adapter named as the model keeps training (its LoRA weights stay trainable).
    model, tokenizer = load_from_model_config(model_args, peft_config=None, adapter_is_trainable=True)
    peft_config = None if hasattr(model, "peft_config") else get_peft_config(model_args)

    checkpoint = training_args.resume_from_checkpoint
    if training_args.warm_start_examples and checkpoint is None:
        if peft_config is not None:
            raise ValueError(
                "warm_start_examples fine-tunes the full model before GRPO; set use_peft: false, or warm start "
                "without LoRA first and train the adapters from that checkpoint."
            )
        run_warm_start(model, tokenizer, train_dataset, agent_config, training_args)

    trainer = MemTrainer(
        model=model,
        args=training_args,
        agent_config=agent_config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )

    if checkpoint in {"last", "latest"} or (isinstance(checkpoint, str) and checkpoint.lower() == "true"):
        checkpoint = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if checkpoint is None:
            raise ValueError(
                f"resume_from_checkpoint asks for the last checkpoint, but {training_args.output_dir} has none."
            )
    if checkpoint is not None:
        logger.info("Resuming from checkpoint %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if recipe is not None and trainer.accelerator.is_main_process:
        Path(training_args.output_dir, "memtrain_recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    Path(training_args.output_dir, "metrics_history.json").write_text(
        json.dumps(trainer.state.log_history, indent=1), encoding="utf-8"
    )
    if push_to_hub:
        push_trained_model(trainer, training_args, model_args, script_args, recipe, metrics)
    return metrics


def run_warm_start(model, tokenizer, train_dataset: Dataset, agent_config: AgentConfig, args: MemTrainConfig) -> None:
    """The small-model supervised warm start (memtrain.warm_start) on the training documents, before GRPO."""
    from memtrain.agent.generation import SamplingConfig, TransformersGenerator
    from memtrain.agent.memory_agent import MemoryAgent
    from memtrain.trainer import default_entity_tools
    from memtrain.warm_start import build_warm_start_examples, warm_start

    agent = MemoryAgent(tokenizer, TransformersGenerator(model, tokenizer, SamplingConfig()), agent_config)
    examples = build_warm_start_examples(
        train_dataset["context"], train_dataset["prompt"], agent, *default_entity_tools(),
        num_examples=args.warm_start_examples, seed=args.seed,
    )  # fmt: skip
    logger.info("Warm start: %d examples, %d epoch(s), lr %g", len(examples), args.warm_start_epochs,
                args.warm_start_learning_rate)  # fmt: skip
    losses = warm_start(
        model, examples, args.warm_start_learning_rate, epochs=args.warm_start_epochs,
        pad_token_id=tokenizer.pad_token_id or 0, seed=args.seed,
    )  # fmt: skip
    if losses:
        logger.info("Warm start loss: first batch %.3f, last batch %.3f", losses[0], losses[-1])
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    Path(args.output_dir, "warm_start_losses.json").write_text(json.dumps(losses), encoding="utf-8")


def push_trained_model(trainer, training_args, model_args, script_args, recipe, metrics) -> str | None:
    """Push the adapter (or full weights) with a memtrain model card."""
    from memtrain.hub import push_folder_to_hub, render_model_card

    if not trainer.accelerator.is_main_process:
        return None
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    card = render_model_card(
        repo_id=repo_id,
        base_model=model_args.model_name_or_path,
        recipe_name=(recipe or {}).get("run_name") or Path(training_args.output_dir).name,
        recipe_yaml=yaml.safe_dump(recipe or {}),
        dataset_id=script_args.dataset_name,
        metrics=metrics,
        is_adapter=hasattr(trainer.model, "peft_config"),
    )
    return push_folder_to_hub(
        training_args.output_dir,
        repo_id,
        card=card,
        private=bool(training_args.hub_private_repo),
        commit_message="memtrain: trained checkpoint",
        token=training_args.hub_token,
    )


def recipe_record(argv: list[str]) -> dict[str, Any]:
    """The recipe file's keys plus the command-line overrides, as saved beside the checkpoint and on the card."""
    recipe: dict[str, Any] = {}
    if argv and not argv[0].startswith("-"):
        recipe = load_recipe(argv[0])
        argv = argv[1:]
    elif "--config" in argv:
        recipe = load_recipe(argv[argv.index("--config") + 1])
    if argv:
        recipe["command_line_overrides"] = " ".join(a for a in argv if a != "--config")
    return recipe


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, agent_config, training_args, model_args = parse_recipe_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(script_args, agent_config, training_args, model_args, recipe=recipe_record(argv))
