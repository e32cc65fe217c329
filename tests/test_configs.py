"""Recipe parsing: positional recipe or --config, CLI overrides, and unknown keys refused before any model loads."""

from __future__ import annotations

import pytest

from memtrain.configs import MemTrainConfig, RecipeError, check_recipe_keys, load_recipe, parse_recipe_args


RECIPE = """\
# Model arguments
model_name_or_path: smollm2-135m
# Data
dataset_name: outputs/data/memtrain-wiki-cpu
# Memory agent
chunk_size: 128
max_chunks: 3
max_memory_tokens: 64
# MemTrain objective
reward_funcs: [masked_entity_em, memory_recall]
reward_weights: [1.0, 0.5]
recall_samples: 4
num_generations: 4
per_device_train_batch_size: 8
# Optimisation
learning_rate: 1.0e-6
use_cpu: true
bf16: false
output_dir: {output_dir}
report_to: none
"""


@pytest.fixture
def recipe_path(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(output_dir=tmp_path / "out"), encoding="utf-8")
    return path


def test_positional_recipe_fills_every_dataclass(recipe_path):
    script_args, agent, training, model = parse_recipe_args([str(recipe_path)])
    assert script_args.dataset_name == "outputs/data/memtrain-wiki-cpu"
    assert (agent.chunk_size, agent.max_chunks, agent.max_memory_tokens) == (128, 3, 64)
    assert isinstance(training, MemTrainConfig)
    assert training.reward_funcs == ["masked_entity_em", "memory_recall"]
    assert training.reward_weights == [1.0, 0.5]
    assert (training.num_generations, training.recall_samples) == (4, 4)
    assert model.model_name_or_path == "smollm2-135m"


def test_command_line_overrides_the_recipe_and_config_flag_works(recipe_path):
    _, agent, training, _ = parse_recipe_args(["--config", str(recipe_path), "--max_steps", "2", "--chunk_size", "96"])
    assert training.max_steps == 2
    assert agent.chunk_size == 96


def test_misspelled_recipe_key_is_named_with_a_suggestion(recipe_path):
    recipe_path.write_text(recipe_path.read_text() + "recal_samples: 8\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"recal_samples.*did you mean recall_samples"):
        parse_recipe_args([str(recipe_path)])


def test_unknown_command_line_option_is_refused(recipe_path):
    with pytest.raises(RecipeError, match="--chunk_sise"):
        parse_recipe_args([str(recipe_path), "--chunk_sise", "64"])


def test_missing_or_malformed_recipe(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)


def test_reward_weights_must_match_reward_funcs(recipe_path):
    with pytest.raises(ValueError, match="one weight per function"):
        parse_recipe_args([str(recipe_path), "--reward_weights", "1.0"])


def test_check_recipe_keys_accepts_env_block():
    check_recipe_keys({"env": {"TOKENIZERS_PARALLELISM": "false"}, "chunk_size": 5})


def test_small_model_settings_are_checked(recipe_path):
    with pytest.raises(ValueError, match="recall_metric must be one of exact, f1"):
        parse_recipe_args([str(recipe_path), "--recall_metric", "contains"])
    with pytest.raises(ValueError, match="warm_start_epochs >= 1"):
        parse_recipe_args([str(recipe_path), "--warm_start_examples", "8", "--warm_start_epochs", "0"])
    *_, training_args, _ = parse_recipe_args([str(recipe_path), "--warm_start_examples", "8", "--recall_metric", "f1"])
    assert training_args.warm_start_examples == 8 and training_args.recall_metric == "f1"


@pytest.mark.parametrize(
    ("entry_point", "keys"),
    [
        ("memtrain.train:main", ["--recall_samples", "--reward_funcs", "--max_memory_tokens", "--load_in_4bit"]),
        ("memtrain.data.build:main", ["--corpus", "--document_template", "--hub_dataset_id"]),
        ("memtrain.data.longqa:main", ["--train_source", "--test_buckets", "--overwrite_output_dir"]),
    ],
)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_key_with_its_default_and_exits_0(entry_point, keys, flag, capsys):
    import importlib

    module, name = entry_point.split(":")
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), name)([flag])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in keys:
        assert f"  {key} " in out or f"  {key}," in out, key
    assert "(default:" in out


@pytest.mark.parametrize(
    "command,key,value",
    [("train", "chunk_size", "abc"), ("eval", "chunk_size", "abc"), ("read", "max_chunks", "many"),
     ("build-data", "num_documents", "many"), ("build-longqa", "num_test_questions", "x"),
     ("build-searchqa", "num_rows", "x"), ("serve-retriever", "port", "http")],
)  # fmt: skip
def test_a_wrong_type_in_a_settings_file_is_one_line_naming_the_file_and_key(tmp_path, capsys, command, key, value):
    """argparse used to print the whole usage (40+ lines) and `argument --key`, not saying the value came from a file."""
    from memtrain import cli

    settings = tmp_path / "settings.yaml"
    settings.write_text(f"{key}: {value}\n" + ("model_name_or_path: x\n" if command == "train" else ""))
    try:
        status = cli.main([command, "--config", str(settings)])
    except SystemExit as exit_info:  # serve-retriever exits itself, as its script always did
        status = exit_info.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "usage:" not in err[0], err
    assert f"{settings}: `{key}`: invalid" in err[0] and repr(value) in err[0]


def test_a_wrong_type_on_the_command_line_names_the_option(capsys):
    from memtrain import cli

    assert cli.main(["eval", "--chunk_size", "abc"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("memtrain eval: error: --chunk_size: invalid int value: 'abc'")
