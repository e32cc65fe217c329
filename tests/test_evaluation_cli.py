"""`memtrain eval`'s settings: TRL's parser, --help, a training recipe as --config, one-line errors, backends."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from memtrain import cli
from memtrain.evaluation.cli import parse_eval_args


ROOT = Path(__file__).resolve().parents[1]
SMOLLM_RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"
REQUIRED = ["--dataset", "rows.jsonl", "--output_dir", "out"]


def test_eval_help_lists_every_key_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("--model", "--dataset", "--dataset_config", "--dataset_split", "--prompt_column", "--context_column",
                "--answers_column", "--output_dir", "--overwrite", "--backend", "--base_url", "--task", "--modes",
                "--chunk_size", "--max_problem_tokens", "--update_template", "--final_template", "--recall_template",
                "--retriever", "--search_observation_tokens", "--multi_question", "--config"):  # fmt: skip
        assert key in out, key


def test_a_training_recipe_gives_eval_its_agent_settings_and_model(tmp_path):
    """The recipe's chunking, every budget (max_problem_tokens too), templates and model; not training's sampling,
    seed, G2 or output_dir, which mean something else in training; the command line wins over the recipe."""
    recipe = yaml.safe_load(SMOLLM_RECIPE.read_text(encoding="utf-8"))
    recipe["final_template"] = "Question: {problem}\nMemory: {memory}\nAnswer:"
    recipe["max_problem_tokens"] = 40
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")

    args, config = parse_eval_args(["--config", str(path), *REQUIRED, "--max_chunks", "5"])
    assert args.model == recipe["model_name_or_path"] == "smollm2-135m"
    assert (config.chunk_size, config.max_problem_tokens, config.max_memory_tokens, config.max_answer_tokens) == (
        64,
        40,
        48,
        16,
    )
    assert config.max_chunks == 5  # command line over the recipe's 3
    assert config.agent_config().templates().final == recipe["final_template"]
    assert args.output_dir == "out" and recipe["output_dir"] != "out"
    # training's temperature 0.7, seed 42 and recall_samples 8 are not evaluation's
    assert (config.temperature, config.seed, config.recall_samples) == (0.0, 0, 1)

    # the shipped recipe as it is, and as the first positional argument
    _, shipped = parse_eval_args([str(SMOLLM_RECIPE), *REQUIRED])
    assert (shipped.chunk_size, shipped.max_chunks, shipped.max_problem_tokens) == (64, 3, 64)


def test_an_eval_settings_file_sets_every_eval_key(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(
        yaml.safe_dump({"model": "m", "dataset": "d", "output_dir": "o", "temperature": 0.5, "seed": 7,
                        "modes": ["agent", "full_context"], "prompt_column": "question", "chunk_size": 100}),
        encoding="utf-8",
    )  # fmt: skip
    args, config = parse_eval_args(["--config", str(path), "--seed", "8"])
    assert (args.model, args.dataset, args.output_dir, args.prompt_column) == ("m", "d", "o", "question")
    assert (config.temperature, config.seed, config.chunk_size, config.modes) == (
        0.5,
        8,
        100,
        ("agent", "full_context"),
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--chunk_sise", "5"], "Unknown command-line option --chunk_sise (did you mean --chunk_size"),
        (["--num_samples", "0"], "--num_samples must be an integer >= 1"),
        (["--backend", "tgi"], "--backend must be one of transformers, vllm"),
        (["--final_template", "no slots"], "final prompt template is missing {problem}, {memory}"),
    ],
)
def test_bad_keys_and_values_are_one_line_errors(capsys, extra, message):
    assert cli.main(["eval", "--model", "m", *REQUIRED, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memtrain eval: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_a_misspelt_key_in_a_recipe_is_refused(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: m\nchunk_sise: 5\n", encoding="utf-8")
    assert cli.main(["eval", "--config", str(path), *REQUIRED]) == 2
    assert "chunk_sise (did you mean chunk_size" in capsys.readouterr().err


def test_missing_required_settings_name_the_key(capsys):
    assert cli.main(["eval", "--model", "m", "--dataset", "d"]) == 2
    assert "--output_dir is required" in capsys.readouterr().err


@pytest.mark.skipif(__import__("memtrain.evaluation.backend").evaluation.backend.vllm_installed(), reason="vLLM here")
@pytest.mark.parametrize("command", ["eval", "read"])
def test_backend_vllm_without_vllm_is_one_clear_line(command, capsys):
    extra = REQUIRED if command == "eval" else ["--context_file", "x.txt", "--question", "q"]
    assert cli.main([command, "--model", "m", *extra, "--backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert f"memtrain {command}: error: --backend vllm: vLLM is not installed: `pip install memtrain[vllm]`" in err
    assert len(err.strip().splitlines()) == 1


class EngineBuilt(Exception):
    """Raised by the stand-in engine: the wiring reached the vLLM call."""


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in for the vLLM package (it needs a GPU): records what `vllm.LLM` is built with, then stops."""
    import dataclasses
    import importlib.machinery
    import sys
    import types

    built: dict = {}

    class LLM:
        def __init__(self, **kwargs):
            built.update(kwargs)
            raise EngineBuilt

    @dataclasses.dataclass
    class EngineArgs:
        logprobs_mode: str = "raw_logprobs"

    modules = {name: types.ModuleType(name) for name in ("vllm", "vllm.engine", "vllm.engine.arg_utils")}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    modules["vllm"].LLM = LLM
    modules["vllm.engine.arg_utils"].EngineArgs = EngineArgs
    monkeypatch.setattr("memtrain.evaluation.backend.vllm_installed", lambda: True)
    return built


def test_backend_vllm_builds_the_in_process_engine(fake_vllm, tiny_checkpoint, tmp_path):
    """`memtrain read/eval --backend vllm` reach `vllm.LLM` with the model folder and the engine settings."""
    context = tmp_path / "c.txt"
    context.write_text("Ann met Bob in Oslo.", encoding="utf-8")
    argv = ["read", "--model", str(tiny_checkpoint), "--context_file", str(context), "--question", "Who?",
            "--backend", "vllm", "--vllm_gpu_memory_utilization", "0.5", "--vllm_max_model_length", "2048",
            "--seed", "3"]  # fmt: skip
    with pytest.raises(EngineBuilt):
        cli.main(argv)
    assert fake_vllm["model"] == str(tiny_checkpoint)
    assert (fake_vllm["gpu_memory_utilization"], fake_vllm["max_model_len"], fake_vllm["seed"]) == (0.5, 2048, 3)
    assert fake_vllm["logprobs_mode"] == "raw_logprobs"

    fake_vllm.clear()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "Who?", "context": "Ann met Bob.", "answers": ["Ann"]}\n', encoding="utf-8")
    with pytest.raises(EngineBuilt):
        cli.main(["eval", "--model", str(tiny_checkpoint), "--dataset", str(rows), "--output_dir",
                  str(tmp_path / "out"), "--backend", "vllm", "--seed", "4"])  # fmt: skip
    assert (fake_vllm["model"], fake_vllm["seed"], fake_vllm["gpu_memory_utilization"]) == (
        str(tiny_checkpoint),
        4,
        0.9,
    )


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("rows.jsonl", b'{"prompt": "caf\xe9", "context": "c", "answers": ["a"]}\n',
         r"--dataset .*rows.jsonl line 1 is not UTF-8 .*iconv"),
        ("rows.json", b'[{"prompt": "caf\xe9"}]', r"--dataset .*rows.json line 1 is not UTF-8"),
        ("rows.jsonl", b'{"prompt": "q", "context": ', r"--dataset .*rows.jsonl line 1: invalid JSON"),
    ],
)  # fmt: skip
def test_an_unreadable_dataset_is_named_before_the_model_loads(name, content, pattern, tmp_path, capsys):
    import re

    from conftest import refusal

    (tmp_path / name).write_bytes(content)
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--dataset", str(tmp_path / name), "--output_dir",
            str(tmp_path / "out")]  # fmt: skip
    line = refusal(argv, capsys)
    assert re.search(pattern, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
