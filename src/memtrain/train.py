"""The GRPO entry point behind ``scripts/run_grpo.py``: recipe -> model + data -> MemTrainer -> checkpoints, Hub.

Kept here rather than in the script so the whole path is importable and tested.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import datasets
import yaml
from datasets import Dataset, load_dataset, load_from_disk

from memtrain.agent.memory_agent import AgentConfig
from memtrain.configs import MemTrainConfig, MemTrainScriptArguments, RecipeError, load_recipe, parse_recipe_args
from memtrain.preflight import (
    PreflightError,
    PushError,
    check_dataset_size,
    check_grpo_options,
    check_output_dir,
    check_push,
    check_reward_names,
    check_training_rows,
    check_training_values,
    check_utf8_file,
    check_vllm_lora_sync,
    claim_output_dir,
    clear_previous_run,
    complete_checkpoints,
    error_summary,
    is_complete_checkpoint,
    push_failed,
    scrub_secrets,
)


logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt", "context", "answers")
_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def load_training_dataset(name: str, config: str | None = None, split: str = "train", task: str = "memory") -> Dataset:
    """A dataset from a ``save_to_disk`` folder, a parquet/json(l)/csv file, or the Hub, checked for the contract.

    Every row is checked here, before any model loads, with the validator ``memtrain eval`` uses (``task``:
    ``memory`` rows need a context to read and gold answers; ``search`` rows need questions and answers).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name).expanduser()
    if (path / "dataset").is_dir():  # a memtrain build: its save_to_disk copy (load_dataset's cache can be stale)
        path = path / "dataset"
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            loaded = load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{path} has splits {list(loaded)}, not {split!r}; set dataset_train_split.")
                loaded = loaded[split]
        else:
            for file in path.rglob("*"):
                if file.suffix in {".jsonl", ".json", ".csv"} and file.is_file():
                    check_utf8_file(file)
            loaded = load_dataset(str(path), config, split=split)
    elif path.suffix in _FILE_BUILDERS and path.exists():
        if path.is_dir():
            raise FileNotFoundError(f"Dataset {name} is a folder named like a file; give the data file itself.")
        if _is_blank(path):
            raise ValueError(f"Dataset file {name} is empty; give a file of rows with {list(REQUIRED_COLUMNS)}.")
        if path.suffix != ".parquet":
            check_utf8_file(path)
        try:
            loaded = load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
        except Exception as error:  # StopIteration (blank lines only), Arrow / JSON parse errors: name the file
            cause = error.__cause__ or error.__context__ or error
            raise ValueError(
                f"Dataset file {name} cannot be read as {path.suffix[1:]} ({type(cause).__name__}: "
                f"{error_summary(cause)}); fix the file, or give rows with {list(REQUIRED_COLUMNS)} as .jsonl, "
                ".json, .csv or .parquet."
            ) from None
    elif path.suffix in _FILE_BUILDERS or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"Dataset file {name} does not exist.")
    else:
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise FileNotFoundError(
                f"Dataset {name} does not exist: no such local file or folder (and it is not a Hub dataset id)."
            ) from None
        try:
            loaded = load_dataset(name, config, split=split)
        except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
            raise FileNotFoundError(
                f"Dataset {name}: no such local file or folder, and the Hub gave no dataset of that id "
                f"({error_summary(error)})."
            ) from None
    missing = [column for column in REQUIRED_COLUMNS if column not in loaded.column_names]
    if missing:
        raise ValueError(
            f"Dataset {name} lacks column(s) {missing}; memtrain rows need {list(REQUIRED_COLUMNS)} "
            f"(it has {loaded.column_names}). Build MemTrain documents with scripts/build_dataset.py."
        )
    check_training_rows(loaded, source=name, task=task)
    return loaded


def _is_blank(path: Path) -> bool:
    """A 0-byte file, or (text formats) one of whitespace only; reads up to the first other byte."""
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            if path.suffix == ".parquet" or chunk.strip():
                return False
    return True


# Files a run writes before its first checkpoint: a run killed then leaves only these (and half-written checkpoints).
UNFINISHED_RUN_FILES = ("warm_start_losses.json",)
_LAST = ("last", "latest", "true")


def unfinished_run_files(output_dir: str | Path) -> list[Path]:
    """The files of a run killed before its first complete checkpoint; [] when the folder holds anything else.

    Such a run cannot be resumed (no checkpoint) and its folder is not empty: ``resume_from_checkpoint: last``
    starts it again in place instead of sending the user to a new output_dir.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    complete, incomplete = complete_checkpoints(folder)
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if complete or any(p not in incomplete and p.name not in UNFINISHED_RUN_FILES for p in files):
        return []
    return files


def resolve_checkpoint(checkpoint: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume: ``last``/``latest``/``true`` is the newest COMPLETE one in ``output_dir``.

    A kill during a checkpoint save leaves a folder with a 0-byte ``optimizer.pt`` and no ``trainer_state.json``;
    resuming from it crashes although an intact earlier checkpoint exists, so half-written ones are skipped.
    """
    if checkpoint is None:
        return None
    if checkpoint in {"last", "latest"} or checkpoint.lower() == "true":
        complete, incomplete = complete_checkpoints(output_dir)
        for skipped in incomplete:
            logger.warning("Skipping %s: its save did not finish (no trainer_state.json or an empty file).", skipped)
        if not complete:
            raise PreflightError(
                f"resume_from_checkpoint asks for the last checkpoint, but {output_dir} has no complete one"
                + (f" ({len(incomplete)} half-written)" if incomplete else "")
                + "; drop resume_from_checkpoint to start afresh in a new output_dir."
            )
        return str(complete[-1])
    if not Path(checkpoint).is_dir():
        raise PreflightError(f"resume_from_checkpoint {checkpoint} is not a checkpoint folder.")
    if not is_complete_checkpoint(checkpoint):
        raise PreflightError(
            f"resume_from_checkpoint {checkpoint} is incomplete (its save did not finish: no trainer_state.json or an "
            "empty file); resume from an earlier checkpoint, or `last` for the newest complete one."
        )
    return checkpoint


def train(
    script_args: MemTrainScriptArguments,
    agent_config: AgentConfig,
    training_args: MemTrainConfig,
    model_args: Any,
    recipe: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Run MemTrain GRPO; returns the final training metrics.

    The run owns its output_dir while it lives (:func:`~memtrain.preflight.claim_output_dir`, taken by the main
    process first): a second run into the same folder is refused at once. Everything that can be checked without
    the model (values, reward names, rows, the output folder, the push) is checked next: at paper scale the model
    load and warm start take minutes, the run hours.
    """
    lock = claim_output_dir(training_args.output_dir) if training_args.process_index == 0 else None
    try:
        return _train(script_args, agent_config, training_args, model_args, recipe)
    finally:
        if lock is not None:
            lock.release()


def _train(
    script_args: MemTrainScriptArguments,
    agent_config: AgentConfig,
    training_args: MemTrainConfig,
    model_args: Any,
    recipe: dict[str, Any] | None,
) -> dict[str, float]:
    from trl import get_peft_config

    from memtrain.models import load_from_model_config
    from memtrain.trainer import MemTrainer

    # The token stays in this function only: Trainer pickles its arguments into every training_args.bin (and the
    # push uploads the final one); memtrain pushes itself, with this token.
    hub_token, training_args.hub_token = training_args.hub_token, None
    check_training_values(vars(training_args))
    check_reward_names(training_args.reward_funcs)
    check_grpo_options(training_args)  # options MemTrainer would ignore, before the dataset and model load
    # use_peft false may still load a published adapter as the model: MemTrainer checks again once it is loaded
    check_vllm_lora_sync(training_args, peft=True if model_args.use_peft else None)
    if training_args.use_vllm:
        from memtrain.vllm_rollouts import check_vllm_version

        check_vllm_version()
    if script_args.dataset_name is None:
        raise ValueError("Set `dataset_name:` in the recipe (a built dataset folder, a file, or a Hub dataset id).")
    resume = training_args.resume_from_checkpoint
    restart = unfinished_run_files(training_args.output_dir) if str(resume).lower() in _LAST else []
    checkpoint = None if restart else resolve_checkpoint(resume, training_args.output_dir)
    overwrite = checkpoint is None and training_args.overwrite_output_dir
    check_output_dir(training_args.output_dir, resuming=checkpoint is not None or bool(restart), overwrite=overwrite)
    # memtrain pushes once, at the end, with its own card (adapter or full weights); Trainer's own pushes (a repo at
    # start, every checkpoint, its generic card) are switched off so the Hub never holds a card-less checkpoint.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    repo_id = training_args.hub_model_id
    if push_to_hub:
        check_push(repo_id, hub_token)
    train_dataset = load_training_dataset(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split,
        task=training_args.agent_type,
    )  # fmt: skip
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    check_dataset_size(
        len(train_dataset),
        generation_batch_size=training_args.generation_batch_size,
        num_generations=training_args.num_generations,
        source=script_args.dataset_name,
    )
    if overwrite:  # only once every check has passed; the other processes wait until the folder is clear
        with training_args.main_process_first(local=False, desc="clearing output_dir"):
            if training_args.process_index == 0:
                removed = clear_previous_run(training_args.output_dir)
                logger.info("overwrite_output_dir: deleted the previous run's %s", ", ".join(removed) or "nothing")
    elif restart or checkpoint is not None:
        # Half-written checkpoints (a kill during a save, its temporary files included) are rewritten when the run
        # reaches their step; a run killed before its first checkpoint starts again from step 0, warm start included.
        with training_args.main_process_first(local=False, desc="clearing half-written checkpoints"):
            if training_args.process_index == 0:
                stale = restart or complete_checkpoints(training_args.output_dir)[1]
                for path in stale:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                if restart:
                    logger.warning(
                        "resume_from_checkpoint last: %s holds no complete checkpoint (the run was stopped before "
                        "its first save); starting it again from step 0 in place (removed %s).",
                        training_args.output_dir, ", ".join(p.name for p in restart),
                    )  # fmt: skip
                elif stale:
                    logger.info("Removed half-written checkpoints: %s", ", ".join(p.name for p in stale))

    # A published memtrain adapter named as the model keeps training (its LoRA weights stay trainable).
    model, tokenizer = load_from_model_config(
        model_args, peft_config=None, adapter_is_trainable=True, trust_remote_code=training_args.trust_remote_code
    )
    peft_config = None if hasattr(model, "peft_config") else get_peft_config(model_args)

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
    secrets = [s for s in (hub_token, os.environ.get("HF_TOKEN")) if s]
    recipe = scrub_secrets(recipe, secrets) if recipe is not None else None
    card = model_card_callback(trainer, training_args, model_args, script_args, recipe)
    trainer.add_callback(card)  # every checkpoint folder gets its README.md model card as it is saved

    if checkpoint is not None:
        logger.info("Resuming from checkpoint %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        card.write(training_args.output_dir, metrics)
    if recipe is not None and trainer.accelerator.is_main_process:
        Path(training_args.output_dir, "memtrain_recipe.yaml").write_text(
            "# Re-run with: python scripts/run_grpo.py memtrain_recipe.yaml (credentials are never saved: log in "
            "with `hf auth login` or HF_TOKEN)\n" + yaml.safe_dump(recipe, sort_keys=False),
            encoding="utf-8",
        )
    Path(training_args.output_dir, "metrics_history.json").write_text(
        json.dumps(trainer.state.log_history, indent=1), encoding="utf-8"
    )
    if push_to_hub:
        try:
            push_trained_model(trainer, training_args, model_args, script_args, recipe, metrics, token=hub_token)
        except Exception as error:
            raise push_failed(error, training_args.output_dir, repo_id) from error
    return metrics


def run_warm_start(model, tokenizer, train_dataset: Dataset, agent_config: AgentConfig, args: MemTrainConfig) -> None:
    """The small-model supervised warm start (memtrain.warm_start) on the training documents, before GRPO."""
    from memtrain.agent.generation import SamplingConfig, TransformersGenerator
    from memtrain.agent.memory_agent import MemoryAgent
    from memtrain.agent.recall import default_entity_tools
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


def model_card_callback(trainer, training_args, model_args, script_args, recipe):
    """The callback that writes the model card into each saved folder (memtrain.hub.ModelCardCallback)."""
    from memtrain.hub import ModelCardCallback

    return ModelCardCallback(
        base_model=model_args.model_name_or_path,
        recipe_name=(recipe or {}).get("run_name") or Path(training_args.output_dir).name,
        recipe_yaml=yaml.safe_dump(recipe or {}, sort_keys=False),
        dataset_id=script_args.dataset_name,
        is_adapter=hasattr(trainer.model, "peft_config"),
    )


def train_with_recipe(recipe: str | Path, overrides: dict[str, Any]) -> Path:
    """Run ``scripts/run_grpo.py recipe --key value ...`` in process; returns the output folder."""
    from memtrain.configs import parse_recipe_args

    argv = [str(recipe)]
    for key, value in overrides.items():
        argv += [f"--{key}", *map(str, value)] if isinstance(value, (list, tuple)) else [f"--{key}", str(value)]
    script_args, agent_config, training_args, model_args = parse_recipe_args(argv)
    train(script_args, agent_config, training_args, model_args, recipe=recipe_record(argv))
    return Path(training_args.output_dir)


def warm_start_checkpoint(recipe: str | Path, train_rows: Dataset, output_dir: str | Path) -> Path:
    """Apply the recipe's warm start to its model and save the result (the common start of benchmark arms)."""
    from memtrain.configs import parse_recipe_args
    from memtrain.models import load_from_model_config

    _, agent_config, training_args, model_args = parse_recipe_args([str(recipe), "--output_dir", str(output_dir)])
    if not training_args.warm_start_examples:
        raise ValueError(f"{recipe} sets no warm_start_examples; there is no warm start to apply.")
    model, tokenizer = load_from_model_config(model_args, peft_config=None)
    run_warm_start(model, tokenizer, train_rows, agent_config, training_args)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return Path(output_dir)


def push_trained_model(
    trainer, training_args, model_args, script_args, recipe, metrics, token: str | None = None
) -> str | None:
    """Push the adapter (or full weights) with a memtrain model card."""
    from memtrain.hub import push_folder_to_hub, render_model_card

    if not trainer.accelerator.is_main_process:
        return None
    repo_id = training_args.hub_model_id
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
        token=token,
    )


def _command_line_values(argv: list[str]) -> dict[str, Any]:
    """``--key value [value ...]`` / ``--key=value`` pairs as recipe keys (several values: a list)."""
    values: dict[str, Any] = {}
    key: str | None = None
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            key = name.replace("-", "_")
            values[key] = [value] if eq else []
        elif key is not None:
            values[key].append(arg)
    return {k: (v[0] if len(v) == 1 else (v or "true")) for k, v in values.items()}


def _typed(value: Any) -> Any:
    """A command-line string as the YAML value a recipe would hold (``2`` -> 2, ``true`` -> True)."""
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if not isinstance(value, str):
        return value
    try:
        loaded = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(loaded, (bool, int, float)):
        return loaded
    try:
        return float(value) if value.strip().lower() not in {"nan", "inf", "-inf"} else value
    except ValueError:
        return value


def recipe_record(argv: list[str]) -> dict[str, Any]:
    """The recipe file's keys with the command-line overrides merged in: a recipe that runs again as it is.

    Secrets are not removed here (see :func:`memtrain.preflight.scrub_secrets`, applied before anything is saved).
    """
    recipe: dict[str, Any] = {}
    if argv and not argv[0].startswith("-"):
        recipe = load_recipe(argv[0])
        argv = argv[1:]
    elif "--config" in argv:
        index = argv.index("--config")
        recipe = load_recipe(argv[index + 1])
        argv = argv[:index] + argv[index + 2 :]
    recipe.update({key: _typed(value) for key, value in _command_line_values(argv).items()})
    return recipe


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the recipe and train; value errors that would crash inside TRL's config parsing are caught first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise ValueError(
            "give a recipe: `memtrain train recipes/smollm2-135m.yaml [--key value ...]` (recipes/README.md lists "
            "them; --help lists every key)."
        )
    record = recipe_record(argv)
    check_training_values(record)
    from memtrain.trainer import MemTrainer

    MemTrainer.check_launcher()  # a DeepSpeed launch is refused before the recipe is parsed or the model loads
    script_args, agent_config, training_args, model_args = parse_recipe_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(script_args, agent_config, training_args, model_args, recipe=record)


def cli(argv: list[str] | None = None) -> int:
    """``scripts/run_grpo.py``: a user error is one line on stderr and exit code 2, never a traceback."""
    try:
        main(argv)
    except (RecipeError, PreflightError, PushError, ValueError, FileNotFoundError) as error:
        print(f"run_grpo: error: {error}", file=sys.stderr)
        return 2
    return 0
