"""The shipped recipes and accelerate configs: every one parses and validates, without loading any model.

A recipe is checked through the same parser as ``scripts/run_grpo.py`` (``parse_recipe_args``), so a recipe that
passes here fails, if ever, on the hardware or the Hub, not on a key or a value. GPU recipes set ``bf16: true``,
which ``transformers.TrainingArguments`` refuses on a machine without a bf16 GPU unless ``use_cpu`` is set
("Your setup doesn't support bf16/gpu"); on such a machine the test adds ``--use_cpu true`` (the only override)
and checks every other value against the raw YAML. vLLM and bitsandbytes are only needed when a trainer or model is
built, never here.
"""

from __future__ import annotations

import enum
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers.utils import is_torch_bf16_gpu_available
from trl import ModelConfig

from memtrain.agent.memory_agent import AgentConfig
from memtrain.configs import (
    RECIPE_DATACLASSES,
    MemTrainConfig,
    MemTrainScriptArguments,
    RecipeError,
    parse_recipe_args,
)


ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = ROOT / "recipes"
ACCELERATE_DIR = RECIPES_DIR / "accelerate_configs"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
ACCELERATE_CONFIGS = sorted(ACCELERATE_DIR.glob("*.yaml"))

# recipe -> (accelerate config it is launched with, training processes it is written for)
LAUNCH = {
    "smollm2-135m.yaml": (None, 1),
    "qwen-0.5b.yaml": ("single_gpu.yaml", 1),
    "qwen-3b.yaml": ("single_gpu.yaml", 1),
    "qwen-7b.yaml": ("single_gpu.yaml", 1),
    "qwen-7b-24gb.yaml": ("single_gpu.yaml", 1),
    "qwen3-4b.yaml": ("single_gpu.yaml", 1),
    "qwen-7b-full.yaml": ("fsdp.yaml", 8),
    "qwen3-4b-full.yaml": ("fsdp.yaml", 8),
}
PAPER_RECIPES = ("qwen-7b-full.yaml", "qwen3-4b-full.yaml")
# Tokens of the update prompt around its three slots, SmolLM2 chat template included (Qwen's is of the same size);
# plus slack for a chunk whose text re-tokenizes a few tokens longer inside the prompt.
CONTEXT_SLACK = 64


def raw(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def cpu_overrides(recipe: dict[str, Any]) -> list[str]:
    """``--use_cpu true`` where the recipe asks for bf16 and this machine has no bf16 GPU, else nothing."""
    if recipe.get("bf16") and not recipe.get("use_cpu") and not is_torch_bf16_gpu_available():
        return ["--use_cpu", "true"]
    return []


def parse(path: Path, *extra: str):
    return parse_recipe_args([str(path), *cpu_overrides(raw(path)), *extra])


def normalise(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def test_every_recipe_is_known():
    """A new recipe must be added to LAUNCH (and so to the README table), and every listed recipe must exist."""
    assert {p.name for p in RECIPES} == set(LAUNCH)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_values_land_in_their_dataclass(path):
    """Every key of the YAML reaches the dataclass that owns it, with the YAML's value."""
    recipe = raw(path)
    parsed = dict(zip(RECIPE_DATACLASSES, parse(path)))
    owners = {f: cls for cls in RECIPE_DATACLASSES for f in cls.__dataclass_fields__}
    for key, expected in recipe.items():
        actual = normalise(getattr(parsed[owners[key]], key))
        if key == "report_to" and expected == "none":
            expected = []
        assert actual == expected, f"{path.name}: {key} parsed as {actual!r}, the YAML says {expected!r}"
    if cpu_overrides(recipe):
        assert parsed[MemTrainConfig].bf16 is True  # the recipe's bf16 survives the CPU-only override


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_follows_memtrain_semantics(path):
    script_args, agent, args, model_args = parse(path)
    assert isinstance(script_args, MemTrainScriptArguments) and isinstance(agent, AgentConfig)
    assert isinstance(model_args, ModelConfig) and model_args.model_name_or_path
    # per_device_train_batch_size counts rollouts: whole groups of G1 on every device, one generation per step.
    assert args.per_device_train_batch_size % args.num_generations == 0
    assert args.generation_batch_size % args.num_generations == 0
    assert args.steps_per_generation == args.gradient_accumulation_steps == 1
    # The objective: final-answer reward + lambda * recall, lambda = 0.5.
    assert args.reward_funcs[1] == "memory_recall" and args.reward_weights == [1.0, 0.5]
    assert args.lenient_recall == args.reward_funcs[0].endswith("_lenient")
    assert args.scale_rewards == "none" and args.filter_zero_variance_groups
    assert args.epsilon == 0.2 and args.epsilon_high == 0.2 and args.top_p == 1.0
    if path.name != "smollm2-135m.yaml":  # the CPU recipe's documented departures: test_cpu_recipe_...
        # The paper's reward, KL, sampling temperature and schedule shape.
        assert args.reward_funcs[0].startswith("masked_entity_em") and args.recall_metric == "exact"
        assert args.beta == 0.001 and args.temperature == 1.0 and not args.warm_start_examples
        assert args.lr_scheduler_type.value == "constant_with_warmup"
    assert args.weight_decay == 0.01 and args.max_grad_norm == 1.0
    assert args.loss_aggregation == "token_mean"
    assert args.output_dir.startswith("outputs/") and args.report_to == []
    # Full fine-tuning keeps fp32 master weights; adapters sit on a bf16 (or NF4) base.
    if model_args.use_peft:
        assert model_args.lora_target_modules and model_args.dtype == "bfloat16"
    else:
        assert model_args.dtype == "float32" and not model_args.load_in_4bit
    if model_args.load_in_4bit:
        assert model_args.use_peft, "QLoRA trains an adapter: load_in_4bit needs use_peft"


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_use_the_paper_settings(name):
    path = RECIPES_DIR / name
    _, agent, args, model_args = parse(path)
    _, processes = LAUNCH[name]
    assert not model_args.use_peft and args.use_vllm and args.bf16 and args.gradient_checkpointing
    assert (agent.chunk_size, agent.max_chunks) == (5000, 8)
    assert agent.max_problem_tokens == agent.max_memory_tokens == agent.max_answer_tokens == 1024
    assert args.num_generations == 8 and args.recall_samples == 8  # G1, G2
    assert args.reward_funcs == ["masked_entity_em", "memory_recall"] and not args.lenient_recall
    assert args.recall_chunk_policy == "any"
    assert args.per_device_train_batch_size * processes // args.num_generations == 32  # documents per step
    assert args.learning_rate == 1.0e-6 and args.warmup_steps == 20 and args.max_steps == 300


def test_cpu_recipe_is_a_small_model_setting_with_reward_spread():
    path = RECIPES_DIR / "smollm2-135m.yaml"
    assert cpu_overrides(raw(path)) == []  # runs as written on this machine
    script_args, agent, args, model_args = parse(path)
    assert model_args.model_name_or_path == "smollm2-135m" and model_args.dtype == "float32"
    assert args.use_cpu and not args.bf16 and not args.use_vllm and not args.gradient_checkpointing
    assert agent.chunk_size == 64 and agent.max_chunks == 3
    assert agent.max_memory_tokens <= 64 and agent.max_answer_tokens <= 32
    assert args.num_generations == 4 and args.recall_samples == 8
    assert 1 <= args.per_device_train_batch_size // args.num_generations <= 2
    # Rewards with spread for a 135M model (benchmarks/reward_signal.py): warm start, F1 shaping, lenient, latest.
    assert args.warm_start_examples > 0 and args.recall_metric == "f1"
    assert args.reward_funcs == ["answer_f1_lenient", "memory_recall"]
    assert args.lenient_recall and args.recall_chunk_policy == "latest"
    assert args.beta == 0.0 and args.temperature == 0.7 and args.learning_rate == 2e-5
    # It reads the folder the CPU data recipe writes.
    data = raw(RECIPES_DIR / "data" / "memtrain-wiki-cpu.yaml")
    assert script_args.dataset_name == f"{data['output_dir']}/dataset"


@pytest.fixture(scope="module")
def update_prompt_overhead(smollm2_tokenizer_dir) -> int:
    """Tokens of the chat-formatted update prompt with its three slots empty."""
    from transformers import AutoTokenizer

    from memtrain.agent.prompts import PromptTemplates

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    update = PromptTemplates().update.format(problem="", memory="", chunk="")
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": update}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return len(encoded["input_ids"])


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name != "smollm2-135m.yaml"], ids=lambda p: p.name)
def test_gpu_recipes_read_the_paper_data_and_fit_vllm_context(path, update_prompt_overhead):
    script_args, agent, args, _ = parse(path)
    data = raw(RECIPES_DIR / "data" / "memtrain-wiki-paper.yaml")
    assert script_args.dataset_name == f"{data['output_dir']}/dataset"
    longest_call = (
        update_prompt_overhead
        + agent.max_problem_tokens
        + agent.max_memory_tokens
        + agent.chunk_size
        + max(agent.max_memory_tokens, agent.max_answer_tokens)
    )
    assert args.vllm_max_model_length >= longest_call + CONTEXT_SLACK, (
        f"{path.name}: vllm_max_model_length {args.vllm_max_model_length} < longest call {longest_call} + slack"
    )
    # the trainer stays resident while vLLM generates: half the card for vLLM, a little more for an adapter-synced
    # FP8 engine (qwen-7b-24gb.yaml: 14.2 of 25.8 GB beside the trainer's 9.9, recipes/README.md)
    limit = 0.6 if args.vllm_lora_sync else 0.5
    assert 0.0 < args.vllm_gpu_memory_utilization <= limit and args.vllm_enable_sleep_mode


def test_misspelled_key_fails_naming_it_and_the_fix(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    shutil.copy(RECIPES_DIR / "qwen-7b.yaml", recipe)
    text = recipe.read_text(encoding="utf-8")
    recipe.write_text(text.replace("\nnum_generations:", "\nnum_generation:"), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"num_generation \(did you mean num_generations"):
        parse_recipe_args([str(recipe)])


def test_unknown_key_fails_before_any_parsing(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        (RECIPES_DIR / "smollm2-135m.yaml").read_text(encoding="utf-8") + "lambda_recall: 0.5\n", encoding="utf-8"
    )
    with pytest.raises(RecipeError, match=r"lambda_recall") as error:
        parse_recipe_args([str(recipe)])
    assert str(recipe) in str(error.value)


def test_misspelled_command_line_override_fails():
    with pytest.raises(RecipeError, match=r"--lerning_rate \(did you mean --learning_rate"):
        parse_recipe_args([str(RECIPES_DIR / "smollm2-135m.yaml"), "--lerning_rate", "1e-5"])


def test_command_line_overrides_win():
    path = RECIPES_DIR / "smollm2-135m.yaml"
    script_args, agent, args, model_args = parse_recipe_args(
        [
            str(path),
            "--num_generations", "2",
            "--per_device_train_batch_size", "4",
            "--chunk_size", "128",
            "--learning_rate", "3e-6",
            "--lenient_recall", "false",
            "--reward_funcs", "masked_entity_em", "memory_recall",
            "--dataset_name", "other/data",
            "--lora_r", "8",
        ]
    )  # fmt: skip
    assert (args.num_generations, args.per_device_train_batch_size, args.learning_rate) == (2, 4, 3e-6)
    assert agent.chunk_size == 128 and agent.max_chunks == raw(path)["max_chunks"]
    assert args.reward_funcs == ["masked_entity_em", "memory_recall"] and not args.lenient_recall
    assert script_args.dataset_name == "other/data" and model_args.lora_r == 8


# ---------------------------------------------------------------------------------------------------- accelerate


def launch_args(config: Path, processes: list[str] | None = None):
    """What `accelerate launch --config_file <config> scripts/run_grpo.py recipe.yaml` resolves, before spawning."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    argv = ["--config_file", str(config), *(processes or []), "scripts/run_grpo.py", "recipes/qwen-7b-full.yaml"]
    args = parser.parse_args(argv)
    dests = {action.dest for action in parser._actions}
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults, dests


def test_accelerate_configs_are_the_expected_three():
    # no DeepSpeed config: MemTrainer refuses DeepSpeed (its engine steps the optimizer once per micro-batch)
    assert {p.name for p in ACCELERATE_CONFIGS} == {"single_gpu.yaml", "ddp.yaml", "fsdp.yaml"}
    assert {c for c, _ in LAUNCH.values() if c} <= {p.name for p in ACCELERATE_CONFIGS}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads_and_launches(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # refuses unknown top-level keys
    assert config.compute_environment.value == "LOCAL_MACHINE" and config.mixed_precision == "bf16"
    assert config.use_cpu is False
    args, defaults, dests = launch_args(path)
    assert args.mixed_precision == "bf16"
    expected = {
        "single_gpu.yaml": ("NO", 1),
        "ddp.yaml": ("MULTI_GPU", 8),
        "fsdp.yaml": ("FSDP", 8),
    }[path.name]
    assert (defaults.distributed_type.value, args.num_processes) == expected
    # Nested keys are copied onto launch arguments by name, silently: a misspelled one would be ignored.
    for key in config.fsdp_config:
        assert key in dests, f"{path.name}: fsdp_config.{key} is not an accelerate launch option"


def test_fsdp_config_is_fsdp2_full_shard_by_transformer_layer():
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = launch_args(ACCELERATE_DIR / "fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"  # FSDP2's full shard
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # Trainer.save_model writes weights only from it
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # transformers refuses FSDP's activation checkpointing together with the recipe's: the recipes own it.
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"
    for name in PAPER_RECIPES:
        assert raw(RECIPES_DIR / name)["gradient_checkpointing"] is True


def test_command_line_process_count_overrides_the_config():
    args, _, _ = launch_args(ACCELERATE_DIR / "fsdp.yaml", ["--num_processes", "4"])
    assert args.num_processes == 4


# ---------------------------------------------------------------------------------------------------- README


def test_readme_table_lists_every_recipe_and_every_path_exists():
    readme = (RECIPES_DIR / "README.md").read_text(encoding="utf-8")
    table_rows = [line for line in readme.splitlines() if line.startswith("| `")]
    listed = {m.group(1) for line in table_rows if (m := re.match(r"\| `([\w.-]+\.yaml)`", line))}
    assert listed == set(LAUNCH), f"README table lists {sorted(listed)}, the recipes are {sorted(LAUNCH)}"
    for mentioned in set(re.findall(r"recipes/[\w./-]+\.yaml", readme)):
        assert (ROOT / mentioned).is_file(), f"recipes/README.md mentions {mentioned}, which does not exist"
    for name, (config, _) in LAUNCH.items():
        if config:
            assert f"accelerate_configs/{config} scripts/run_grpo.py recipes/{name}" in " ".join(readme.split()), (
                f"README has no launch command for {name} with {config}"
            )


# ------------------------------------------------------------------------------------------- post-training recipes

POST_TRAINING = sorted((RECIPES_DIR / "post_training").glob("*.yaml"))


def test_post_training_recipes_are_the_expected_four():
    assert [p.name for p in POST_TRAINING] == [
        "mem1-qwen-7b.yaml", "mem1-smollm2-135m.yaml", "memagent-qwen-7b.yaml", "memagent-smollm2-135m.yaml",
    ]  # fmt: skip


@pytest.mark.parametrize("path", POST_TRAINING, ids=lambda p: p.name)
def test_post_training_recipes_parse_and_follow_their_method(path):
    recipe = raw(path)
    parsed = parse(path)
    _, agent, args, model_args = parsed
    for key, expected in recipe.items():
        owner = next(obj for obj in parsed if key in type(obj).__dataclass_fields__)
        if key != "report_to" and not (key == "use_cpu" and cpu_overrides(recipe)):
            assert normalise(getattr(owner, key)) == expected, f"{path.name}: {key}"
    # Downstream post-training has no recall probes and no masked entity: only the final answer is rewarded.
    assert "memory_recall" not in args.reward_funcs and not args.train_recall_answers
    assert args.per_device_train_batch_size % args.num_generations == 0
    assert args.scale_rewards == "none" and args.filter_zero_variance_groups and args.beta == 0.001
    if path.name.startswith("mem1"):
        assert args.agent_type == "search" and args.retriever and args.reward_funcs == ["search_em"]
    else:
        assert args.agent_type == "memory" and args.reward_funcs[0].startswith("answer_")
    if "qwen" in path.name:  # the paper's settings: lr 1e-6 (MemAgent) / 5e-7 (MEM1), 8 rollouts, 500 / 200 steps
        assert args.num_generations == 8
        expected = (5e-7, 200) if path.name.startswith("mem1") else (1e-6, 500)
        assert (args.learning_rate, args.max_steps) == expected
    else:
        assert args.use_cpu and model_args.model_name_or_path == "smollm2-135m"


@pytest.mark.parametrize("path", POST_TRAINING, ids=lambda p: p.name)
def test_post_training_recipes_name_files_that_exist_or_are_built(path):
    text = path.read_text(encoding="utf-8")
    for mentioned in set(re.findall(r"(?:recipes|tests/fixtures)/[\w./-]+\.(?:yaml|jsonl|json)", text)):
        assert (ROOT / mentioned).is_file(), f"{path.name} mentions {mentioned}, which does not exist"
