"""MemTrainer across 2 processes (torchrun, gloo, CPU): every path runs its collectives in lockstep.

Each test runs tests/ddp_worker.py, whose processes read documents of different lengths (so they have different
numbers of rows and micro-batches) and whose scoring forwards each run an all-reduce, as FSDP's do. A path that
runs a different number of forwards per process hangs; the timeout turns that into a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


TESTS = Path(__file__).parent


def run_workers(tokenizer_dir: Path, out: Path, mode: str, timeout: float = 240) -> list[dict]:
    """Both processes' reports. A hang fails the test: torchrun is stopped (it stops its workers), then killed.

    Output goes to a file, not a pipe: a worker left behind would hold a pipe open and block the read forever.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "ddp_worker.py"), str(tokenizer_dir), str(out), mode]  # fmt: skip
    log = out / "torchrun.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()  # torchrun sends its workers SIGTERM and waits for them
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            pytest.fail(f"the 2-process {mode} run hung for {timeout:.0f} s:\n{log.read_text()[-3000:]}")
    assert process.returncode == 0, log.read_text()[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def assert_same_values(mine: list[dict], theirs: list[dict]) -> None:
    assert mine, "nothing was logged"
    for a, b in zip(mine, theirs, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-9, nan_ok=True), key  # one gathered value


def assert_lockstep(reports: list[dict], *paths: str) -> None:
    """Same steps, same weights, same number of collective forwards on each path, though the rollouts differed."""
    first, second = reports
    assert all(r["world_size"] == 2 for r in reports)
    assert first["global_step"] == second["global_step"]
    assert first["generator_calls"] != second["generator_calls"]  # the ranks really did different work
    assert first["checksum"] == pytest.approx(second["checksum"], rel=1e-6)
    for path in paths:
        assert first["forwards"].get(path, 0) > 0, path
    assert first["forwards"] == second["forwards"]
    assert_paired_generation_rounds(reports)


def assert_paired_generation_rounds(reports: list[dict]) -> None:
    """transformers generate in synced rounds (as under FSDP): both processes make the same number of calls, each
    generates its own batch to its own budget, and a process with nothing to generate joins with one filler row of
    one token, never a batch padded to the other's width or budget."""
    first, second = (r["rounds"] for r in reports)
    assert first and len(first) == len(second)
    for rounds in (first, second):
        assert all(round_ == [1, 1, 1] for round_ in rounds if round_[2]), rounds  # fillers: one row, one token
    assert any(mine != theirs for mine, theirs in zip(first, second))  # each its own batch and budget
    assert any(round_[2] for round_ in first + second)  # the shorter process did wait in filler rounds


def test_reused_rollouts_score_old_log_probs_in_lockstep(smollm2_tokenizer_dir, tmp_path):
    """num_iterations 2: old log-probs at rollout time, the same number of forwards on both processes."""
    reports = run_workers(smollm2_tokenizer_dir, tmp_path, "iterations")
    assert_lockstep(reports, "old_logps", "train")
    assert all(r["global_step"] == 2 for r in reports)
    assert_same_values(reports[0]["logged"], reports[1]["logged"])
    assert len(reports[0]["logged"]) == 1  # one rollout phase for the two updates


def test_a_generation_split_over_steps_scores_in_lockstep(smollm2_tokenizer_dir, tmp_path):
    """steps_per_generation 2 (gradient accumulation 1): the second step's rows need their sampling log-probs."""
    reports = run_workers(smollm2_tokenizer_dir, tmp_path, "generation")
    assert_lockstep(reports, "old_logps", "train")
    assert all(r["global_step"] == 2 for r in reports)
    assert_same_values(reports[0]["logged"], reports[1]["logged"])


def test_evaluation_runs_its_forwards_in_lockstep(smollm2_tokenizer_dir, tmp_path):
    reports = run_workers(smollm2_tokenizer_dir, tmp_path, "eval")
    assert_lockstep(reports, "eval", "train")
    assert "old_logps" not in reports[0]["forwards"]  # one update per rollout: no old log-probs needed
    assert_same_values(reports[0]["eval_logged"], reports[1]["eval_logged"])
    assert reports[0]["eval_logged"][0]["eval_rows_trained"] > 0
