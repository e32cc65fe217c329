"""scripts/gpu_smoke.py in its CPU mode: the same cases as on a GPU, one JSON summary line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memtrain import gpu_smoke


REPO = Path(__file__).resolve().parents[1]


def _summary(capsys) -> dict:
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1  # the summary alone: the trainer's log lines go to stderr
    return json.loads(lines[0])


def test_qlora_case_on_cpu(capsys):
    pytest.importorskip("bitsandbytes")
    assert gpu_smoke.main(["--device", "cpu", "--cases", "qlora_nf4"]) == 0
    summary = _summary(capsys)
    assert summary["gpu_smoke"] == "ok" and summary["device"] == "cpu"
    (case,) = summary["cases"]
    assert case["case"] == "qlora_nf4" and case["status"] == "ok" and case["steps"] == 2
    assert case["loss_finite"] and case["adapter_changed"] and case["nf4_base_identical"]
    assert case["sync_max_rel_error"] < 1e-2 and case["seconds"] > 0 and case["peak_rss_mib"] > 0


def test_a_case_that_does_not_train_is_reported_failed(capsys, monkeypatch):
    """Scripted answers all right: every group has zero variance, nothing trains, the adapter must not pass."""
    monkeypatch.setattr(gpu_smoke.ScriptedGeneration, "__call__", _all_right)
    assert gpu_smoke.main(["--device", "cpu", "--cases", "lora_bf16"]) == 1
    summary = _summary(capsys)
    assert summary["gpu_smoke"] == "failed"
    assert summary["cases"][0]["status"] == "failed" and summary["cases"][0]["adapter_changed"] is False


def _all_right(self, prompt_ids, images=None, multimodal_fields=None, num_generations=1, **kwargs):
    reply = self.tokenizer(f"\\boxed{{{gpu_smoke.ANSWER}}}", add_special_tokens=False)["input_ids"]
    return [reply + [self.tokenizer.eos_token_id] for _ in prompt_ids], None


def test_bad_arguments_are_one_line(capsys):
    assert gpu_smoke.main(["--device", "cpu", "--cases", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown case(s) ['nope']" in err[0]


@pytest.mark.slow
def test_every_case_on_cpu_through_the_script():
    pytest.importorskip("bitsandbytes")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_smoke.py"), "--device", "cpu"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    (line,) = done.stdout.strip().splitlines()
    summary = json.loads(line)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [c["case"] for c in summary["cases"]] == ["lora_bf16", "full_fp32_autocast", "qlora_nf4", "run_grpo_qlora"]
    assert all(c["status"] == "ok" and c["loss_finite"] for c in summary["cases"])
    full = summary["cases"][1]
    assert full["reference_model"] and full["master_dtype"] == "torch.float32"
    assert summary["cases"][3]["adapter_saved"]
