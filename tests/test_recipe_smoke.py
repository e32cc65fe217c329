"""memtrain.recipe_smoke without running anything: the documented launch commands, the overrides, the CPU launcher.

The runs themselves (every shipped recipe, real processes) are tests/vllm_real/test_shipped_recipes.py, `make test-recipes`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from memtrain.recipe_smoke import (
    CPU_PROCESSES,
    REPO,
    SHRUNK,
    RecipeSmokeError,
    documented_launch,
    header_commands,
    launch_command,
    recipe_task,
    shipped_recipes,
    smoke_overrides,
)


def test_documented_launch_is_the_recipes_own_header_command():
    assert documented_launch(REPO / "recipes/qwen-7b.yaml") == [
        "accelerate", "launch", "--config_file", "recipes/accelerate_configs/single_gpu.yaml",
        "scripts/run_grpo.py", "recipes/qwen-7b.yaml",
    ]  # fmt: skip
    assert documented_launch(REPO / "recipes/smollm2-135m.yaml")[:3] == ["python", "scripts/run_grpo.py",
                                                                          "recipes/smollm2-135m.yaml"]  # fmt: skip
    # a header's other commands (build the data, start the retriever) are not the launch
    commands = header_commands(REPO / "recipes/post_training/mem1-qwen-7b.yaml")
    assert any(c.startswith("python scripts/serve_retriever.py") for c in commands)
    assert documented_launch(REPO / "recipes/post_training/mem1-qwen-7b.yaml")[-1] == (
        "recipes/post_training/mem1-qwen-7b.yaml"
    )


def test_every_shipped_recipe_documents_its_launch():
    for recipe in shipped_recipes():
        tokens = documented_launch(recipe)
        assert "scripts/run_grpo.py" in tokens


def test_a_recipe_without_a_documented_command_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr("memtrain.recipe_smoke.REPO", tmp_path)
    recipe = tmp_path / "recipes" / "new.yaml"
    recipe.parent.mkdir()
    recipe.write_text("# A new recipe without its command.\nmodel_name_or_path: Qwen/Qwen2.5-7B-Instruct\n")
    with pytest.raises(RecipeSmokeError, match=r"recipes/new.yaml: its header documents no training command"):
        documented_launch(recipe, repo=tmp_path)


def test_overrides_touch_only_model_data_budgets_and_what_a_cpu_refuses(tmp_path):
    recipe = yaml.safe_load((REPO / "recipes/qwen-7b.yaml").read_text())
    overrides = smoke_overrides(recipe, tmp_path / "m", tmp_path / "d", tmp_path / "o", on_cpu=True)
    allowed = {"model_name_or_path", "dataset_name", "output_dir", "use_cpu", "vllm_enable_sleep_mode"}
    allowed |= set(SHRUNK) | {"vllm_max_model_length"}
    assert set(overrides) <= allowed
    assert overrides["max_steps"] == 1 and overrides["vllm_enable_sleep_mode"] is False
    assert "search_max_turns" not in overrides  # only where the recipe has the key
    cpu_recipe = yaml.safe_load((REPO / "recipes/smollm2-135m.yaml").read_text())
    assert "vllm_enable_sleep_mode" not in smoke_overrides(cpu_recipe, tmp_path, tmp_path, tmp_path, on_cpu=True)
    on_gpu = smoke_overrides(recipe, tmp_path / "m", tmp_path / "d", tmp_path / "o", on_cpu=False)
    assert "use_cpu" not in on_gpu and "vllm_enable_sleep_mode" not in on_gpu


def test_multi_gpu_config_runs_two_processes_on_a_cpu(tmp_path):
    documented = documented_launch(REPO / "recipes/qwen-7b-full.yaml")
    command = launch_command(documented, REPO / "recipes/qwen-7b-full.yaml", {"max_steps": 1}, on_cpu=True)
    script = command.index("scripts/run_grpo.py")
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[script - 2 : script] == ["--num_processes", str(CPU_PROCESSES)]
    assert command[script + 1] == "recipes/qwen-7b-full.yaml" and command[-2:] == ["--max_steps", "1"]
    single = launch_command(documented_launch(REPO / "recipes/qwen-7b.yaml"), Path("x"), {}, on_cpu=True)
    assert "--num_processes" not in single


@pytest.mark.parametrize(
    "name,task",
    [("qwen-7b.yaml", "memtrain"), ("smollm2-135m.yaml", "memtrain"), ("post_training/mem1-qwen-7b.yaml", "search"),
     ("post_training/memagent-qwen-7b.yaml", "longqa")],
)  # fmt: skip
def test_recipe_task_picks_the_data_the_recipe_trains_on(name, task):
    assert recipe_task(yaml.safe_load((REPO / "recipes" / name).read_text())) == task
