"""The checks run before anything expensive: each refuses what would fail (or silently misbehave) later."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memtrain.preflight import (
    RUN_LOCK,
    PreflightError,
    check_dataset_size,
    check_output_dir,
    check_training_rows,
    check_training_values,
    check_utf8_file,
    claim_output_dir,
    complete_checkpoints,
    is_complete_checkpoint,
    is_secret_key,
    scrub_secrets,
)


def test_secrets_are_dropped_by_key_and_by_value():
    recipe = {
        "hub_token": "hf_abcdefghijklmnop",
        "openai_api_key": "sk-123",
        "pad_token": "<|endoftext|>",
        "max_new_tokens": 64,
        "env": {"HF_TOKEN": "hf_abcdefghijklmnop", "TOKENIZERS_PARALLELISM": "false"},
        "note": "pushed with --hub_token hf_abcdefghijklmnop",
        "run_name": "uses mysecretvalue inside",
    }
    scrubbed = scrub_secrets(recipe, secrets=["mysecretvalue"])
    assert scrubbed == {
        "pad_token": "<|endoftext|>",
        "max_new_tokens": 64,
        "env": {"TOKENIZERS_PARALLELISM": "false"},
        "note": "pushed with --hub_token <redacted>",
        "run_name": "uses <redacted> inside",
    }
    assert is_secret_key("hub_token") and not is_secret_key("eos_token") and not is_secret_key("max_prompt_token")


def test_known_secrets_are_redacted_at_every_depth_of_lists_tuples_and_mappings():
    """A known secret (not shaped like a Hub token) inside a list, a tuple, or a mapping inside a list."""
    recipe = {
        "launch_args": ["--hub_token", "mysecretvalue"],
        "env_pairs": ("KEY", "x-mysecretvalue-y"),
        "steps": [{"name": "push", "args": [["--token=mysecretvalue"]], "hub_token": "mysecretvalue"}],
        "keep": [1, 2.5, None, True, "plain"],
    }
    scrubbed = scrub_secrets(recipe, secrets=["mysecretvalue"])
    assert "mysecretvalue" not in json.dumps(scrubbed)
    assert scrubbed == {
        "launch_args": ["--hub_token", "<redacted>"],
        "env_pairs": ["KEY", "x-<redacted>-y"],
        "steps": [{"name": "push", "args": [["--token=<redacted>"]]}],
        "keep": [1, 2.5, None, True, "plain"],
    }


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"max_steps": "-3"}, "max_steps must be a positive"),
        ({"max_steps": 0}, "max_steps must be a positive"),
        ({"max_steps": "1.5"}, "max_steps must be a whole number"),
        ({"num_generations": "1"}, "num_generations must be >= 2"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1"),
        ({"num_train_epochs": 0}, "num_train_epochs must be > 0"),
        ({"learning_rate": "-1e-5"}, "learning_rate must be >= 0"),
    ],
)
def test_impossible_values_are_named(values, pattern):
    with pytest.raises(PreflightError, match=pattern):
        check_training_values(values)


def test_sensible_values_pass():
    check_training_values({"max_steps": -1, "num_train_epochs": 1, "num_generations": 8, "learning_rate": "1e-6"})
    check_training_values({"max_steps": "200", "num_train_epochs": 0})  # epochs are ignored when max_steps is set


def test_output_dir_hidden_files_do_not_count_as_a_run(tmp_path):
    (tmp_path / ".cache").mkdir()
    check_output_dir(tmp_path, resuming=False)
    (tmp_path / "trainer_state.json").write_text("{}")
    with pytest.raises(PreflightError, match="already holds files of another run"):
        check_output_dir(tmp_path, resuming=False)
    check_output_dir(tmp_path, resuming=False, overwrite=True)
    check_output_dir(tmp_path, resuming=True)


def test_rows_and_sizes(tmp_path):
    good = {"prompt": "q", "context": "c", "answers": ["a"]}
    check_training_rows([good], source="rows")
    with pytest.raises(PreflightError, match=r"rows row 1: `answers` must be a non-empty list of non-empty"):
        check_training_rows([good, {**good, "answers": [""]}], source="rows")
    with pytest.raises(PreflightError, match=r"rows has no rows"):
        check_training_rows([], source="rows")
    check_training_rows([{"prompt": "q", "context": "", "answers": [["a"], ["b"]]}], source="s", task="search")
    with pytest.raises(PreflightError, match=r"has 1 document\(s\) but one step needs 2"):
        check_dataset_size(1, generation_batch_size=4, num_generations=2, source="d")
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(good).encode() + b"\n" + b'{"prompt": "\xe9"}\n')
    with pytest.raises(PreflightError, match=r"rows.jsonl line 2 is not UTF-8"):
        check_utf8_file(path)


def _checkpoint(folder, files: dict[str, bytes], state: str | None = '{"global_step": 2}'):
    folder.mkdir(parents=True)
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    ("files", "state", "complete"),
    [
        ({"model.safetensors": b"weights", "optimizer.pt": b"state"}, '{"global_step": 2}', True),
        # a valid trainer_state.json does not make a checkpoint with a 0-byte file complete
        ({"model.safetensors": b"weights", "optimizer.pt": b""}, '{"global_step": 2}', False),
        ({"model.safetensors": b""}, '{"global_step": 2}', False),
        # FSDP's sharded state dicts are folders: an empty shard inside one counts too
        ({"pytorch_model_fsdp_0/__0_0.distcp": b""}, '{"global_step": 2}', False),
        ({"pytorch_model_fsdp_0/__0_0.distcp": b"shard"}, '{"global_step": 2}', True),
        ({"model.safetensors": b"weights"}, None, False),  # killed before trainer_state.json
        ({"model.safetensors": b"weights"}, '{"global_st', False),  # killed while writing it
        ({"model.safetensors": b"weights"}, "", False),
    ],
)
def test_a_checkpoint_is_complete_only_with_its_state_and_no_empty_file(tmp_path, files, state, complete):
    checkpoint = _checkpoint(tmp_path / "checkpoint-2", files, state)
    assert is_complete_checkpoint(checkpoint) is complete
    assert complete_checkpoints(tmp_path) == (([checkpoint], []) if complete else ([], [checkpoint]))


def test_complete_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    steps = [_checkpoint(tmp_path / f"checkpoint-{n}", {"model.safetensors": b"w"}) for n in (10, 9, 100)]
    broken = _checkpoint(tmp_path / "checkpoint-11", {"model.safetensors": b""})
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint folder
    assert complete_checkpoints(tmp_path) == ([steps[1], steps[0], steps[2]], [broken])


def test_a_claimed_output_dir_is_refused_to_any_other_claim_until_released(tmp_path):
    folder = tmp_path / "runs" / "a"
    lock = claim_output_dir(folder)
    assert lock.held and (folder / RUN_LOCK).read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(
        PreflightError, match=rf"output_dir .*runs/a is in use by another memtrain run \(pid {os.getpid()}"
    ):
        claim_output_dir(folder)  # a second open file, even in this process
    check_output_dir(folder, resuming=False)  # the hidden lock file is not another run's file
    lock.release()
    assert not (tmp_path / "runs").exists()  # the folders the claim created held nothing else: removed
    with claim_output_dir(folder) as again:
        (folder / "model.safetensors").write_bytes(b"w")
        assert again.held
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]  # the run's output stays, the lock goes


def test_a_killed_holder_frees_the_folder(tmp_path):
    folder = tmp_path / "run"
    code = "import sys, time; from memtrain.preflight import claim_output_dir; claim_output_dir(sys.argv[1]); "
    code += "print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PreflightError, match=rf"in use by another memtrain run \(pid {holder.pid} on "):
            claim_output_dir(folder)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays
        holder.wait()
        holder.stdout.close()
    assert (folder / RUN_LOCK).is_file()
    with claim_output_dir(folder) as lock:
        assert lock.held


def test_a_claim_on_a_file_or_an_unwritable_place_is_refused_without_creating_anything(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PreflightError, match="is a file, not a folder"):
        claim_output_dir(tmp_path / "a-file")
    with pytest.raises(PreflightError, match="cannot be created"):
        claim_output_dir(tmp_path / "a-file" / "run")
