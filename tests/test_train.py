"""The run_grpo path end to end: recipe -> local model + LoRA -> built documents -> one step -> adapter pushed with a card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import refusal, save_built_documents
from datasets import Dataset
from huggingface_hub import ModelCard
from test_hub import FakeHubServer

from memtrain.configs import parse_recipe_args
from memtrain.preflight import PreflightError, is_complete_checkpoint
from memtrain.rewards import register_reward
from memtrain.train import cli, load_training_dataset, main, resolve_checkpoint


SECRET = "hf_fake_secret_1234567890"


def files_containing(folder: Path, secret: str) -> list[str]:
    """`grep -rl secret folder`: every file (pickles, checkpoints, hidden files included) holding the secret."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()
    )


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
        "warmup_steps": 0,  # MemTrainConfig warms up for 20 steps (the paper): step 1 would have learning rate 0
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

    metrics = main([str(path), "--learning_rate", "1e-3", "--hub_token", SECRET])

    assert "train_runtime" in metrics
    assert (output_dir / "adapter_config.json").is_file() and (output_dir / "memtrain_recipe.yaml").is_file()
    saved = yaml.safe_load((output_dir / "memtrain_recipe.yaml").read_text())
    assert saved["lora_r"] == 4 and saved["learning_rate"] == 1e-3 and "hub_token" not in saved
    assert hub.token == SECRET  # the push itself used the token ...
    assert files_containing(output_dir, SECRET) == []  # ... which no written file holds
    assert [name for name, data in hub.commits[-1]["files"].items() if SECRET.encode() in data] == []
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
    again.update(save_strategy="steps", save_steps=1, run_name="tiny-continued")
    path.write_text(yaml.safe_dump(again), encoding="utf-8")
    main([str(path), "--learning_rate", "1e-2", "--reward_funcs", "answer_length", "memory_recall"])
    second = load_file(tmp_path / "continued" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)

    # Saved folders describe themselves without a push: the checkpoint as it is saved, the final folder after.
    for folder in (tmp_path / "continued" / "checkpoint-1", tmp_path / "continued"):
        local_card = ModelCard.load(folder / "README.md")
        assert local_card.data.library_name == "peft" and "memtrain" in local_card.data.tags
        text = local_card.text
        assert "recipe `tiny-continued`" in text and str(output_dir) in text  # the recipe and its base model
        assert "answer_length" in text and f'from_pretrained("{folder}")' in text  # loads from the folder itself
    assert "| train_runtime |" in (tmp_path / "continued" / "README.md").read_text()
    assert "| global_step | 1 |" in (tmp_path / "continued" / "checkpoint-1" / "README.md").read_text()


def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        load_training_dataset(str(tmp_path / "missing.parquet"))
    Dataset.from_list([{"prompt": "p", "text": "t"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['context', 'answers'\]"):
        load_training_dataset(str(tmp_path / "bad"))


def full_recipe(model: Path, documents: Path, output_dir: Path, **overrides) -> dict:
    """The smallest full-weights run: 1 step, a checkpoint at step 1 (training_args.bin and all)."""
    recipe = {
        "model_name_or_path": str(model), "dtype": "float32", "dataset_name": str(documents),
        "chunk_size": 48, "max_chunks": 2, "max_memory_tokens": 4, "max_answer_tokens": 4,
        "reward_funcs": ["answer_length"], "num_generations": 2, "per_device_train_batch_size": 2,
        "recall_samples": 2, "max_steps": 1, "use_cpu": True, "bf16": False, "report_to": "none",
        "save_strategy": "steps", "save_steps": 1, "trajectory_html_steps": 0, "output_dir": str(output_dir),
    }  # fmt: skip
    recipe.update(overrides)
    return recipe


def write_recipe(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.mark.parametrize("how", ["command_line", "recipe", "environment"])
def test_no_token_reaches_any_written_or_pushed_file(how, tiny_checkpoint, built_documents, tmp_path, monkeypatch):
    hub = FakeHubServer(monkeypatch, accepted_tokens={SECRET})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    output_dir = tmp_path / "run"
    recipe = full_recipe(tiny_checkpoint, built_documents, output_dir, push_to_hub=True, hub_model_id="me/t")
    argv = []
    if how == "command_line":
        argv = ["--hub_token", SECRET]
    elif how == "recipe":
        recipe["hub_token"] = SECRET
    else:
        monkeypatch.setenv("HF_TOKEN", SECRET)
    path = write_recipe(tmp_path, recipe)

    main([str(path), *argv])

    assert (output_dir / "checkpoint-1" / "training_args.bin").is_file()
    assert files_containing(output_dir, SECRET) == []
    assert hub.token in (SECRET, None) and hub.commits, "the push ran"
    assert [name for name, data in hub.commits[-1]["files"].items() if SECRET.encode() in data] == []
    # The saved recipe runs again as it is: the loader accepts every key and the values are the run's.
    saved = output_dir / "memtrain_recipe.yaml"
    _, _, training_args, _ = parse_recipe_args([str(saved), "--push_to_hub", "false"])
    assert training_args.max_steps == 1 and training_args.reward_funcs == ["answer_length"]


def test_saved_recipe_merges_command_line_overrides_into_its_keys(tiny_checkpoint, built_documents, tmp_path):
    output_dir = tmp_path / "run"
    path = write_recipe(tmp_path, full_recipe(tiny_checkpoint, built_documents, output_dir, save_strategy="no"))
    main([str(path), "--learning_rate", "3e-4", "--reward_funcs", "answer_length", "memory_recall"])
    saved = output_dir / "memtrain_recipe.yaml"
    record = yaml.safe_load(saved.read_text())
    assert "command_line_overrides" not in record
    assert record["learning_rate"] == 3e-4 and record["reward_funcs"] == ["answer_length", "memory_recall"]
    _, _, again, _ = parse_recipe_args([str(saved)])
    assert again.learning_rate == 3e-4 and again.reward_funcs == ["answer_length", "memory_recall"]


def _checkpoint(folder: Path, step: int, complete: bool) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "optimizer.pt").write_bytes(b"state" if complete else b"")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_resume_last_picks_the_newest_complete_checkpoint(tmp_path):
    _checkpoint(tmp_path, 2, complete=True)
    _checkpoint(tmp_path, 10, complete=True)
    _checkpoint(tmp_path, 12, complete=False)  # killed during its save: 0-byte optimizer.pt, no trainer_state.json
    assert resolve_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    with pytest.raises(PreflightError, match="incomplete"):
        resolve_checkpoint(str(tmp_path / "checkpoint-12"), str(tmp_path))
    only_broken = tmp_path / "broken"
    _checkpoint(only_broken, 3, complete=False)
    with pytest.raises(PreflightError, match=r"no complete one \(1 half-written\)"):
        resolve_checkpoint("last", str(only_broken))


def test_resume_from_a_real_checkpoint_after_a_killed_save(tiny_checkpoint, built_documents, tmp_path):
    output_dir = tmp_path / "run"
    path = write_recipe(tmp_path, full_recipe(tiny_checkpoint, built_documents, output_dir))
    main([str(path)])
    broken = output_dir / "checkpoint-2"
    broken.mkdir()
    (broken / "optimizer.pt").write_bytes(b"")
    (broken / ".tmpa1b2c3").write_bytes(b"x" * 1000)  # a temporary file the killed save left behind
    metrics = main([str(path), "--max_steps", "2", "--resume_from_checkpoint", "last"])
    assert "train_runtime" in metrics
    assert (output_dir / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (broken / ".tmpa1b2c3").exists()  # the half-written save was cleared before being redone


def test_a_run_killed_before_its_first_checkpoint_goes_on_in_place(tiny_checkpoint, built_documents, tmp_path, capsys):
    """A rerun is refused and points at `--resume_from_checkpoint last`, which now starts it again in place (it
    used to refuse too, pointing at a new output_dir: a circle)."""
    output_dir = tmp_path / "run"
    (output_dir / "checkpoint-1").mkdir(parents=True)
    (output_dir / "warm_start_losses.json").write_text("[1.4, 0.2]")
    (output_dir / "checkpoint-1" / "optimizer.pt").write_bytes(b"")  # killed during its first save
    (output_dir / "checkpoint-1" / ".tmpa1b2c3").write_bytes(b"x" * 1000)
    path = write_recipe(tmp_path, full_recipe(tiny_checkpoint, built_documents, output_dir))
    line = refusal(["train", str(path)], capsys)
    assert "already holds files of another run" in line and "--resume_from_checkpoint last" in line
    metrics = main([str(path), "--resume_from_checkpoint", "last"])
    assert "train_runtime" in metrics
    assert is_complete_checkpoint(output_dir / "checkpoint-1")
    assert not (output_dir / "checkpoint-1" / ".tmpa1b2c3").exists()
    assert not (output_dir / "warm_start_losses.json").exists()  # no warm start in this recipe: the old one went


def test_resume_last_never_restarts_over_a_finished_run(built_documents, tmp_path, capsys):
    """A folder with a final model but no checkpoint (save_strategy no) is not an unfinished run: still refused."""
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_bytes(b"finished model")
    (output_dir / "warm_start_losses.json").write_text("[1.4]")
    path = write_recipe(tmp_path, full_recipe(tmp_path / "no-model", built_documents, output_dir))
    line = refusal(["train", str(path), "--resume_from_checkpoint", "last"], capsys)
    assert "has no complete one" in line
    assert (output_dir / "model.safetensors").read_bytes() == b"finished model"


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    import re

    lines = [line for line in err.splitlines() if line.startswith("run_grpo: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"max_steps": -3}, r"max_steps must be a positive number.*got -3"),
        ({"max_steps": 0}, r"max_steps must be a positive number.*got 0"),
        ({"num_generations": 0}, r"num_generations must be >= 2.*got 0"),
        ({"reward_funcs": ["masked_entity_emm"]}, r"reward_funcs: Unknown reward function 'masked_entity_emm'"),
        ({"loss_type": "grpo"}, r"loss_type"),  # a GRPOConfig option MemTrainer would ignore
        ({"use_vllm": True}, r"use_vllm is set but vLLM is not installed; TRL 1.16 needs vLLM 0.22.0 to 0.31.0"),
    ],
)
def test_bad_values_are_refused_before_the_model_loads(
    override, pattern, built_documents, tmp_path, capsys, monkeypatch
):
    # The model folder does not exist: reaching the model load would give a different error.
    monkeypatch.setattr("memtrain.vllm_rollouts.installed_vllm_version", lambda: None)  # also in the vLLM world
    recipe = full_recipe(tmp_path / "no-model", built_documents, tmp_path / "run", **override)
    assert_one_line_error(*run_cli([str(write_recipe(tmp_path, recipe))], capsys), pattern)
    assert not (tmp_path / "run").exists()


def test_a_deepspeed_launch_is_refused_before_the_recipe_is_read(built_documents, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch --config_file zero3.yaml` sets
    recipe = full_recipe(tmp_path / "no-model", built_documents, tmp_path / "run")
    assert_one_line_error(
        *run_cli([str(write_recipe(tmp_path, recipe))], capsys), r"does not run under DeepSpeed.*FSDP2"
    )
    assert not (tmp_path / "run").exists()


def test_an_output_dir_of_another_run_is_refused_unless_resuming(built_documents, tmp_path, capsys):
    output_dir = tmp_path / "run"
    _checkpoint(output_dir, 4, complete=True)
    (output_dir / "model.safetensors").write_bytes(b"old final model")
    path = write_recipe(tmp_path, full_recipe(tmp_path / "no-model", built_documents, output_dir))
    assert_one_line_error(*run_cli([str(path)], capsys), r"already holds files of another run \(checkpoint-4")
    assert (output_dir / "model.safetensors").read_bytes() == b"old final model"
    # Resuming it passes this check (and stops at the missing model).
    code, err = run_cli([str(path), "--resume_from_checkpoint", "last"], capsys)
    assert code != 0 and "another run" not in err


def test_a_second_run_into_a_live_runs_output_dir_is_refused_at_once(
    tiny_checkpoint, built_documents, tmp_path, capsys
):
    """Two `run_grpo` runs into one output_dir: the first (a real process, training) owns the folder; the second is
    refused with one line before its model loads; once the first is killed (SIGKILL) the folder is free again."""
    import os
    import subprocess
    import sys
    import time

    from memtrain.preflight import RUN_LOCK, claim_output_dir

    output_dir = tmp_path / "run"
    path = write_recipe(
        tmp_path,
        full_recipe(tiny_checkpoint, built_documents, output_dir, max_steps=10_000, reward_funcs=["answer_f1"]),
    )  # fmt: skip (a reward the script knows: answer_length is registered by this test module only)
    log = (tmp_path / "first.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_grpo.py"
    first = subprocess.Popen([sys.executable, str(script), str(path)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 240

        def started() -> bool:  # the first run holds the folder, or (without a claim) has written into it
            lock = output_dir / RUN_LOCK
            if lock.is_file() and f"pid {first.pid} " in lock.read_text():
                return True
            return output_dir.is_dir() and any(not p.name.startswith(".") for p in output_dir.iterdir())

        while not started():
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        start = time.perf_counter()
        code, err = run_cli([str(path)], capsys)
        assert_one_line_error(code, err, rf"output_dir .*run is in use by another memtrain run \(pid {first.pid} on ")
        assert "wait for it to finish, or choose another output_dir" in err
        assert time.perf_counter() - start < 60  # no model load, no warm start
        assert first.poll() is None, "the first run was disturbed"
    finally:
        first.kill()
        first.wait()
        log.close()
    with claim_output_dir(output_dir) as lock:  # a killed run holds nothing
        assert lock.held


def test_overwrite_output_dir_clears_the_previous_run_once_the_checks_pass(built_documents, tmp_path, capsys):
    output_dir = tmp_path / "run"
    _checkpoint(output_dir, 4, complete=True)
    (output_dir / "model.safetensors").write_bytes(b"old final model")
    (output_dir / ".keep").write_text("hidden")
    path = write_recipe(tmp_path, full_recipe(tmp_path / "no-model", built_documents, output_dir))
    # A refused run deletes nothing.
    code, err = run_cli([str(path), "--overwrite_output_dir", "true", "--max_steps", "0"], capsys)
    assert code == 2 and (output_dir / "checkpoint-4").is_dir()
    # Checks pass: the old run is gone before the model load (which then fails here), hidden files stay.
    code, err = run_cli([str(path), "--overwrite_output_dir", "true"], capsys)
    assert code != 0 and "another run" not in err
    assert sorted(p.name for p in output_dir.iterdir()) == [".keep"]


def test_an_unwritable_output_dir_is_refused_before_the_model_loads(built_documents, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    path = write_recipe(tmp_path, full_recipe(tmp_path / "no-model", built_documents, tmp_path / "a-file" / "run"))
    assert_one_line_error(*run_cli([str(path)], capsys), r"output_dir .* cannot be created: .*a-file is a file")


@pytest.mark.parametrize(
    ("setting", "pattern"),
    [
        ("offline", r"the Hub is offline \(HF_HUB_OFFLINE=1\)"),
        ("no_login", r"there is no Hub login"),
        ("bad_token", r"the Hub refused the login check \(401"),
        ("no_id", r"set hub_model_id"),
    ],
)
def test_a_push_that_cannot_succeed_is_refused_before_the_model_loads(
    setting, pattern, built_documents, tmp_path, monkeypatch, capsys
):
    FakeHubServer(monkeypatch, accepted_tokens={SECRET})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login either
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    extra = {"push_to_hub": True, "hub_model_id": "me/t", "hub_token": SECRET}
    if setting == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif setting == "no_login":
        del extra["hub_token"]
    elif setting == "bad_token":
        extra["hub_token"] = "hf_wrong_token_00000000"
    else:
        del extra["hub_model_id"]
    recipe = full_recipe(tmp_path / "no-model", built_documents, tmp_path / "run", **extra)
    assert_one_line_error(*run_cli([str(write_recipe(tmp_path, recipe))], capsys), pattern)


def test_when_only_the_push_fails_the_local_output_is_complete(
    tiny_checkpoint, built_documents, tmp_path, monkeypatch, capsys
):
    FakeHubServer(monkeypatch, fail_commits=True)
    output_dir = tmp_path / "run"
    recipe = full_recipe(tiny_checkpoint, built_documents, output_dir, push_to_hub=True, hub_model_id="me/t")
    code, err = run_cli([str(write_recipe(tmp_path, recipe)), "--hub_token", SECRET], capsys)
    assert_one_line_error(code, err, r"holds the complete local output, but the push to me/t failed .*503")
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "memtrain_recipe.yaml").is_file()


def test_a_dataset_smaller_than_one_step_is_refused(built_documents, tmp_path, capsys):
    recipe = full_recipe(tmp_path / "no-model", built_documents, tmp_path / "run", per_device_train_batch_size=6)
    assert_one_line_error(
        *run_cli([str(write_recipe(tmp_path, recipe))], capsys), r"has 2 document\(s\) but one step needs 3"
    )


ROW = {"prompt": "Where is Lyon?", "context": "Lyon is in France.", "answers": ["France"]}


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ({"context": ""}, r"row 1: `context` is empty"),
        ({"answers": []}, r"row 1: `answers` must be a non-empty list"),
        ({"answers": "France"}, r"row 1: `answers` must be a non-empty list"),
    ],
)
def test_rows_eval_rejects_are_rejected_at_load_with_their_number(bad, pattern, tmp_path):
    import json

    path = tmp_path / "rows.jsonl"
    rows = [ROW, {**ROW, **bad}]
    if isinstance(bad.get("answers"), str):  # one column type per file: all plain strings
        rows = [{**ROW, "answers": "France"}, {**ROW, "answers": "France"}]
        pattern = pattern.replace("row 1", "row 0")
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.raises(PreflightError, match=pattern):
        load_training_dataset(str(path))


def test_non_utf8_and_missing_datasets_are_named(tmp_path, monkeypatch):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(('{"prompt": "p", "context": "caf\u00e9", "answers": ["a"]}\n').encode("latin-1"))
    with pytest.raises(PreflightError, match=r"latin1.jsonl line 1 is not UTF-8"):
        load_training_dataset(str(path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Dataset outputs/data/docs does not exist: no such local"):
        load_training_dataset("outputs/data/docs")


CUSTOM_CONFIG = """from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "memtrain_tiny_custom"
"""
CUSTOM_MODEL = """from transformers import LlamaForCausalLM

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def test_trust_remote_code_is_honoured(tiny_checkpoint, built_documents, tmp_path, capsys):
    """A checkpoint whose architecture is code in its folder (auto_map) loads only with trust_remote_code."""
    config_path = tiny_checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "memtrain_tiny_custom"
    config["architectures"] = ["TinyCustomForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
    }
    config_path.write_text(json.dumps(config))
    (tiny_checkpoint / "configuration_tiny_custom.py").write_text(CUSTOM_CONFIG)
    (tiny_checkpoint / "modeling_tiny_custom.py").write_text(CUSTOM_MODEL)
    recipe = full_recipe(tiny_checkpoint, built_documents, tmp_path / "run", save_strategy="no")
    path = write_recipe(tmp_path, recipe)
    assert cli([str(path)]) != 0  # without it the custom code is not run
    assert "trust_remote_code" in capsys.readouterr().err
    assert "train_runtime" in main([str(path), "--trust_remote_code", "true"])


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", r"Dataset file .*rows.jsonl is empty; give a file of rows with \['prompt', 'context', 'answers'\]"),
        (b"\n \n", r"Dataset file .*rows.jsonl is empty"),
        (b'{"prompt": "q", "context": ', r"Dataset file .*rows.jsonl cannot be read as jsonl \("),
        (b'{"prompt": "caf\xe9"}\n', r"Dataset .*rows.jsonl line 1 is not UTF-8 .*iconv"),
    ],
)
def test_an_unreadable_dataset_file_is_named_in_one_line(content, pattern, tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_bytes(content)
    argv = ["train", "--dataset_name", str(tmp_path / "rows.jsonl"), "--model_name_or_path", str(tmp_path / "no-model"),
            "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--bf16", "false"]  # fmt: skip
    line = refusal(argv, capsys)
    assert re.search(pattern, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # nothing written, no output_dir


def test_train_without_arguments_asks_for_a_recipe(capsys):
    line = refusal(["train"], capsys)
    assert "give a recipe: `memtrain train recipes/smollm2-135m.yaml [--key value ...]`" in line
