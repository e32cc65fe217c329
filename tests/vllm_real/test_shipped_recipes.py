"""Every recipe in recipes/ and recipes/post_training/ runs, shrunk, with the command its header documents, in the
environment the README's vLLM install gives users; then ``memtrain eval --config <recipe>`` evaluates its output.

What a CPU cannot run as shipped is overridden with its reason asserted here: vLLM's CPU platform has no sleep mode,
and Accelerate turns an FSDP config into plain multi-process data parallel (MULTI_CPU) without GPUs.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from cpu_shims import trl_vllm_serve

from memtrain.configs import parse_recipe_args
from memtrain.recipe_smoke import (
    CPU_PROCESSES,
    REPO,
    build_tiny_model,
    data_recipes,
    documented_launch,
    run_data_recipe_smoke,
    run_recipe_smoke,
    shipped_recipes,
)


# recipe -> (launcher, engine): what each shipped recipe is run with. A new recipe must be added here (and runs).
EXPECTED = {
    "qwen-0.5b.yaml": ("single_gpu.yaml", "vllm"),
    "qwen-3b.yaml": ("single_gpu.yaml", "vllm"),
    "qwen-7b.yaml": ("single_gpu.yaml", "vllm"),
    "qwen-7b-24gb.yaml": ("single_gpu.yaml", "vllm"),
    "qwen3-4b.yaml": ("single_gpu.yaml", "vllm"),
    "qwen-7b-full.yaml": ("fsdp.yaml", "vllm"),
    "qwen3-4b-full.yaml": ("fsdp.yaml", "vllm"),
    "smollm2-135m.yaml": ("python", "transformers"),
    "post_training/memagent-qwen-7b.yaml": ("fsdp.yaml", "vllm"),
    "post_training/mem1-qwen-7b.yaml": ("fsdp.yaml", "vllm"),
    "post_training/memagent-smollm2-135m.yaml": ("python", "transformers"),
    "post_training/mem1-smollm2-135m.yaml": ("python", "transformers"),
}
# data recipe -> the Hub inputs it names, which the smoke build replaces by local stand-ins (none: runs as shipped)
EXPECTED_DATA = {
    "data/memtrain-wiki-cpu.yaml": set(),
    "data/longqa-hotpotqa-cpu.yaml": set(),
    "data/memtrain-wiki-paper.yaml": {"corpus", "streaming", "embedding_model", "tokenizer_name_or_path"},
    "data/longqa-hotpotqa-paper.yaml": {"train_source", "test_source", "filter_model"},
}
RECIPES = shipped_recipes()
DATA_RECIPES = data_recipes()
pytestmark = pytest.mark.recipes  # `make test-recipes`; `make test-vllm` runs the rest of this folder


@pytest.fixture(scope="module")
def smoke_work(tmp_path_factory) -> Path:
    """One folder for the module: the tiny models and the built datasets are shared by every recipe."""
    return tmp_path_factory.mktemp("recipe-smoke")


def name_of(path: Path) -> str:
    return path.relative_to(REPO / "recipes").as_posix()


def test_the_runs_cover_every_shipped_recipe():
    """The list run below is the list in recipes/: a recipe cannot ship without running here."""
    assert sorted(name_of(path) for path in RECIPES) == sorted(EXPECTED)
    assert sorted(name_of(path) for path in DATA_RECIPES) == sorted(EXPECTED_DATA)
    on_disk = {p.relative_to(REPO / "recipes").as_posix() for p in (REPO / "recipes").rglob("*.yaml")}
    launch_configs = {p for p in on_disk if p.startswith("accelerate_configs/")}
    assert on_disk - launch_configs == set(EXPECTED) | set(EXPECTED_DATA)


@pytest.mark.parametrize("path", DATA_RECIPES, ids=name_of)
def test_data_recipe_builds_shrunk(path, smoke_work):
    """Every data recipe builds through its documented command: small counts, and local stand-ins only for what it
    reads from the Hub (no network here: the Wikipedia stream, bge, Qwen's tokenizer, HotpotQA, the filter model)."""
    smoke = run_data_recipe_smoke(path, smoke_work)
    replaced = {key for key in smoke.overrides if key in yaml.safe_load(path.read_text(encoding="utf-8"))}
    counts = {"num_documents", "num_neighbours", "num_random", "corpus_limit", "min_tokens", "max_tokens",
              "train_num_docs", "test_buckets", "num_test_questions", "max_train_questions", "output_dir"}  # fmt: skip
    assert replaced - counts == EXPECTED_DATA[name_of(path)]
    assert smoke.splits and all(rows > 0 for rows in smoke.splits.values()), smoke.splits


@pytest.mark.parametrize("path", RECIPES, ids=name_of)
def test_recipe_parses_as_shipped_in_the_users_environment(path):
    """The issue's reproduction: every key of every recipe is known to this transformers/TRL (transformers 5.17
    refused `activation_checkpointing`, a 5.23 key, in every recipe)."""
    parse_recipe_args([str(path), "--use_cpu", "true"])


def test_vllm_cpu_platform_has_no_sleep_mode():
    """Why the smoke runs set vllm_enable_sleep_mode false on a CPU: vLLM refuses it there at engine start."""
    from vllm.platforms import current_platform

    assert current_platform.is_cpu() and not current_platform.is_sleep_mode_available()
    from memtrain.vllm_version import installed_vllm_version

    assert installed_vllm_version() == "0.31.0"  # the CPU build's distribution (vllm-cpu) is read as vLLM


@pytest.mark.parametrize("path", RECIPES, ids=name_of)
def test_shipped_recipe_trains_one_step_and_evaluates(path, smoke_work):
    launcher, engine = EXPECTED[name_of(path)]
    documented = documented_launch(path)
    if launcher == "python":
        assert documented[:2] == ["python", "scripts/run_grpo.py"]
    else:
        assert documented[:4] == ["accelerate", "launch", "--config_file", f"recipes/accelerate_configs/{launcher}"]
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert bool(values.get("use_vllm")) == (engine == "vllm")

    smoke = run_recipe_smoke(path, smoke_work, on_cpu=True)

    assert smoke.global_step == 1 and smoke.rows_trained > 0 and smoke.tokens_trained > 0
    assert all(loss == loss for loss in smoke.losses)  # finite, not NaN
    if engine == "vllm":
        assert smoke.weight_syncs == 1.0  # the real CPU engine generated, synced once in the step
        assert "--backend" in smoke.eval_command and "vllm" in smoke.eval_command
    if launcher == "fsdp.yaml":
        # Two gloo processes; Accelerate applies an FSDP config only with GPUs: on CPUs it is data parallel.
        assert smoke.distributed.startswith(f"{CPU_PROCESSES} process(es), MULTI_CPU"), smoke.distributed
    else:
        assert smoke.distributed.startswith("1 process(es), NO"), smoke.distributed
    (run,) = smoke.eval_metrics["runs"]
    assert run["metrics"]["avg"]["n"] == 2 and run["mode"] == "agent"


def readme_adapter_server_commands() -> tuple[list[str], list[str]]:
    """recipes/README.md's adapter-only server-mode example: (the server's command, the trainer's), as shell words."""
    text = (REPO / "recipes" / "README.md").read_text(encoding="utf-8")
    block = text.split("**LoRA/QLoRA with adapter-only sync")[1].split("```bash")[1].split("```")[0]
    server, trainer = (shlex.split(command.replace("\\\n", " ")) for command in block.strip().split("\n\n"))
    return server, trainer


def test_the_24gb_recipe_runs_in_server_mode_as_recipes_readme_launches_it(smoke_work):
    """The README's server-mode example (issue 22): ``trl vllm-serve`` with runtime LoRA loading, then qwen-7b-24gb.yaml
    through its launcher with the README's overrides, adapter-only sync over HTTP. On a CPU the server drops only what
    a CPU cannot take (FP8, a GPU memory share) and serves the smoke run's tiny model on a free port."""
    from memtrain.tiny_models import architecture_of

    server, trainer = readme_adapter_server_commands()
    env = dict(word.split("=", 1) for word in server[: server.index("trl")])
    assert env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "1" and set(env) == {"CUDA_VISIBLE_DEVICES"}
    assert server[server.index("trl") + 1] == "vllm-serve" and server[-1] == "&"
    options = server[server.index("vllm-serve") + 1 : -1]
    assert "--enable-lora" in options
    rank = options[options.index("--max-lora-rank") + 1]
    assert options[options.index("--quantization") + 1] == "fp8"  # dropped here: vLLM's CPU build has no FP8

    recipe = REPO / trainer[trainer.index("scripts/run_grpo.py") + 1]
    assert recipe.name == "qwen-7b-24gb.yaml"
    values = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    assert int(rank) >= int(values["lora_r"])
    words = trainer[trainer.index("scripts/run_grpo.py") + 2 :]
    overrides = {key.removeprefix("--"): value for key, value in zip(words[::2], words[1::2], strict=True)}
    assert overrides["vllm_mode"] == "server" and overrides["vllm_quantization"] == "none"

    model = build_tiny_model(smoke_work / f"tiny-{architecture_of(values['model_name_or_path'])}",
                             architecture_of(values["model_name_or_path"]))  # fmt: skip
    log = smoke_work / "server-qwen-7b-24gb.log"
    lora = ["--enable-lora", "--max-lora-rank", rank]
    with trl_vllm_serve(str(model), log, lora, {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}, dtype="bfloat16") as url:
        overrides["vllm_server_port"] = url.rsplit(":", 1)[1]
        smoke = run_recipe_smoke(recipe, smoke_work, on_cpu=True, extra_overrides=overrides, evaluate=False)
    assert smoke.global_step == 1 and smoke.rows_trained > 0 and smoke.tokens_trained > 0
    assert smoke.weight_syncs == 1.0  # the step's adapter, loaded into the server once
    assert all(loss == loss for loss in smoke.losses)
    served = log.read_text(encoding="utf-8")  # the server's access log
    # the adapter loaded at trainer start and the step's, the first one unloaded; the rollouts generated through it
    assert served.count('"POST /v1/load_lora_adapter HTTP/1.1" 200') == 2
    assert served.count('"POST /v1/unload_lora_adapter HTTP/1.1" 200') == 1
    assert '"POST /v1/completions HTTP/1.1" 200' in served and "/update_weights" not in served
