"""Smoke check of the training paths on one GPU (or the CPU), with no downloads: ONE JSON summary line on stdout.

Everything is built locally: a tiny random Qwen2 and a byte-level BPE chat tokenizer (``tokenizers``, Qwen-style
``<|im_start|>`` template) in a temporary folder. Cases, 2 MemTrainer steps each:

* ``lora_bf16``: bf16 base + LoRA, beta > 0 (KL reference = the adapter-off base);
* ``full_fp32_autocast``: fp32 master weights under bf16 autocast with TRL's reference model (full fine-tuning);
* ``qlora_nf4``: NF4 base (bitsandbytes) + LoRA, beta > 0; the packed base must be bit-identical after the steps and
  :func:`memtrain.weight_sync.iter_vllm_weights` must give ``dequant(base) + delta`` (skipped without bitsandbytes);
* ``run_grpo_qlora``: ``accelerate launch scripts/run_grpo.py`` of a small QLoRA recipe (transformers generation)
  on the tiny model and a saved dataset.

The in-process cases answer model calls with a fixed script (the two rollouts of a document get one right and one
wrong final answer), so every step has a non-zero advantage and the adapter must move; ``run_grpo_qlora`` generates
for real. Recall probes are off (reward ``masked_entity_em`` only): they need spaCy, which the GPU image lacks.

On a machine with only torch, transformers, accelerate and peft (plus pyarrow, pandas, fsspec, xxhash), carry five
wheels (~45 MB): trl and datasets (TRL's GRPOTrainer and memtrain.train import ``datasets`` at module level), dill and
multiprocess (datasets' needs), and bitsandbytes (without it the NF4 cases are skipped)::

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
        trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    # there: pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site \
    #     python scripts/gpu_smoke.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


ANSWER = "Quito"
PROBLEM = "Based on the entire article, which city is represented by the [MASK] placeholder?"


def build_tokenizer(folder: Path) -> Any:
    """A byte-level BPE over a few sentences (any text encodes), Qwen's special tokens and chat template, saved."""
    from memtrain.tiny_models import build_chat_tokenizer

    corpus = [_context(n) for n in range(20)] + [PROBLEM, "Updated memory: the article is about a city.", "\\boxed{}"]
    return build_chat_tokenizer(folder, corpus)


def build_model(folder: Path, tokenizer: Any, seed: int = 0) -> None:
    """A tiny random Qwen2 over the tokenizer's vocabulary, saved in fp32."""
    from memtrain.tiny_models import save_tiny_model

    save_tiny_model(folder, tokenizer, "qwen2", seed)


def _context(n: int) -> str:
    return " ".join(f"The old port of {ANSWER} trades spices and cloth, ledger {n}-{k}." for k in range(6))


def rows(num_documents: int = 3) -> list[dict[str, Any]]:
    return [
        {"id": f"doc{d}", "prompt": PROBLEM, "context": _context(d), "answers": [ANSWER]} for d in range(num_documents)
    ]


class ScriptedGeneration:
    """Stands in for TRL's generation: memory updates write a note; of each pair of final answers one is right."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, prompt_ids, images=None, multimodal_fields=None, num_generations=1, **kwargs):
        completions = []
        for position, ids in enumerate(prompt_ids):
            text = self.tokenizer.decode(ids)
            reply = (
                "a note on the port"
                if "Updated memory" in text
                else f"\\boxed{{{ANSWER if position % 2 == 0 else 'Lima'}}}"
            )
            completions.append(
                self.tokenizer(reply, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            )
        return completions, None


def _config(output_dir: Path, device: str, bf16: bool, beta: float, **extra: Any):
    from memtrain.configs import MemTrainConfig

    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=6, num_generations=2, recall_samples=2,
        reward_funcs=["masked_entity_em"], reward_weights=[1.0], train_recall_answers=False, max_steps=2,
        report_to="none", use_cpu=device == "cpu", bf16=bf16, seed=0, trajectory_html_steps=0, beta=beta,
        warmup_steps=0, learning_rate=1e-3, save_strategy="no", logging_steps=1, gradient_checkpointing=True,
    )  # fmt: skip
    settings.update(extra)
    return MemTrainConfig(**settings)


def _agent():
    from memtrain.agent.memory_agent import AgentConfig

    return AgentConfig(chunk_size=32, max_chunks=2, max_problem_tokens=64, max_memory_tokens=16, max_answer_tokens=16)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])


def _train(model: Any, tokenizer: Any, args: Any, peft_config: Any = None) -> tuple[Any, dict[str, Any]]:
    """Build MemTrainer, train 2 steps with scripted generation; return the trainer and the trainable change."""
    from datasets import Dataset

    from memtrain.trainer import MemTrainer

    trainer = MemTrainer(
        model=model, args=args, agent_config=_agent(), train_dataset=Dataset.from_list(rows()),
        processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip
    trainer._generate_single_turn = ScriptedGeneration(tokenizer)
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    moved = sum(int(not torch.equal(before[n], after[n].detach().float())) for n in before)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    info = {
        "steps": trainer.state.global_step,
        "loss": losses,
        "loss_finite": bool(losses) and all(math.isfinite(float(x)) for x in losses),
        "trainable_changed": f"{moved}/{len(before)}",
        "adapter_changed": moved > 0,
        "trainable_dtypes": sorted({str(p.dtype) for p in after.values() if p.requires_grad}),
        "kl": [entry.get("kl") for entry in trainer.state.log_history if "loss" in entry],
    }
    return trainer, info


def case_lora_bf16(work: Path, device: str) -> dict[str, Any]:
    from memtrain.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(work / "model"), dtype="bfloat16", device_map=_device_map(device))
    _, info = _train(model, tokenizer, _config(work / "lora_bf16", device, bf16=True, beta=0.04), _lora())
    return info


def case_full_fp32_autocast(work: Path, device: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    args = _config(work / "full", device, bf16=True, beta=0.04, model_init_kwargs={"dtype": "float32"})
    trainer, info = _train(str(work / "model"), tokenizer, args)  # a path: TRL loads the policy and its reference
    info["reference_model"] = trainer.ref_model is not None
    info["master_dtype"] = str(next(trainer.model.parameters()).dtype)
    info["ok_check"] = info["reference_model"] and info["master_dtype"] == "torch.float32"
    return info


def case_qlora_nf4(work: Path, device: str) -> dict[str, Any]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "skipped", "reason": "bitsandbytes is not installed"}
    import bitsandbytes as bnb

    from memtrain.models import load_model_and_tokenizer
    from memtrain.weight_sync import iter_vllm_weights

    model, tokenizer = load_model_and_tokenizer(str(work / "model"), load_in_4bit=True, dtype="bfloat16")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    packed = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for n, m in layers.items()}
    trainer, info = _train(model, tokenizer, _config(work / "qlora", device, bf16=True, beta=0.04), _lora())
    base_identical = all(
        torch.equal(m.weight.data, packed[n][0]) and torch.equal(m.weight.quant_state.absmax, packed[n][1])
        for n, m in layers.items()
    )
    # the out-of-place sync: dequant(base) + delta, base untouched
    from peft.tuners.lora import LoraLayer

    weights = dict(iter_vllm_weights(trainer.model))
    worst = 0.0
    for name, layer in trainer.model.named_modules():
        if isinstance(layer, LoraLayer):
            base = layer.get_base_layer()
            expected = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            expected += layer.get_delta_weight("default").float()
            got = weights[name.removeprefix("base_model.model.") + ".weight"].float()
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    base_identical_after_sync = all(torch.equal(m.weight.data, packed[n][0]) for n, m in layers.items())
    return {
        **info,  # trainable_dtypes: fp32 Adam masters (MemTrainer undoes TRL's bf16 cast on a quantized base)
        "nf4_layers": len(layers),
        "nf4_base_identical": base_identical and base_identical_after_sync,
        "sync_weights": len(weights),
        "sync_max_rel_error": worst,
        "ok_check": base_identical
        and base_identical_after_sync
        and worst < 1e-2
        and info["trainable_dtypes"] == ["torch.float32"],
    }


RECIPE = """\
model_name_or_path: {model}
dtype: bfloat16
load_in_4bit: true
use_peft: true
lora_r: 8
lora_alpha: 16
lora_target_modules: [q_proj, k_proj, v_proj, o_proj, down_proj]
dataset_name: {dataset}
chunk_size: 32
max_chunks: 2
max_problem_tokens: 64
max_memory_tokens: 16
max_answer_tokens: 16
reward_funcs: [masked_entity_em]
reward_weights: [1.0]
train_recall_answers: false
recall_samples: 2
num_generations: 2
per_device_train_batch_size: 4
beta: 0.04
use_vllm: false
use_cpu: {use_cpu}
bf16: {bf16}
gradient_checkpointing: true
learning_rate: 1.0e-3
warmup_steps: 0
max_steps: 2
logging_steps: 1
save_strategy: "no"
report_to: none
trajectory_html_steps: 0
output_dir: {output}
seed: 0
"""


def case_run_grpo(work: Path, device: str, repo: Path) -> dict[str, Any]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "skipped", "reason": "bitsandbytes is not installed"}
    from datasets import Dataset

    Dataset.from_list(rows(4)).save_to_disk(str(work / "dataset"))
    recipe = work / "qlora-tiny.yaml"
    output = work / "run_grpo"
    recipe.write_text(
        RECIPE.format(
            model=work / "model",
            dataset=work / "dataset",
            output=output,
            use_cpu=str(device == "cpu").lower(),
            bf16=str(device != "cpu").lower(),
        ),
        encoding="utf-8",
    )
    config = repo / "recipes" / "accelerate_configs" / "single_gpu.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if device == "cpu":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
        command += ["--mixed_precision", "no"]
    command += [str(repo / "scripts" / "run_grpo.py"), str(recipe)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=repo)
    history_file = output / "metrics_history.json"
    if done.returncode != 0 or not history_file.exists():
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        return {"status": "failed", "returncode": done.returncode, "error": " | ".join(tail)}
    history = json.loads(history_file.read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    adapter = output / "adapter_model.safetensors"
    return {
        "steps": max((entry.get("step", 0) for entry in history), default=0),
        "loss": losses,
        "loss_finite": bool(losses) and all(math.isfinite(float(x)) for x in losses),
        "adapter_saved": adapter.exists(),
        "adapter_changed": None,  # real generation by a random model: rewards may all be 0 (groups filtered)
        "skipped_steps": [entry.get("skipped_steps") for entry in history if "loss" in entry],
        "ok_check": adapter.exists(),
    }


def _device_map(device: str) -> dict[str, Any] | None:
    return {"": "cpu"} if device == "cpu" else {"": 0}


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> dict[str, float]:
    if device == "cuda":
        return {"peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_case(name: str, body: Callable[[], dict[str, Any]], device: str) -> dict[str, Any]:
    """One case: ok / skipped / failed, seconds, peak memory and what it checked; never raises."""
    _peak_reset(device)
    start = time.perf_counter()
    try:
        info = body()
        status = info.pop("status", None)
        if status is None:
            checks = [info.get("loss_finite", False), info.get("ok_check", True)]
            if info.get("adapter_changed") is not None:
                checks.append(info["adapter_changed"])
            status = "ok" if all(checks) else "failed"
    except Exception as error:  # the summary line reports it; the traceback goes to stderr
        traceback.print_exc()
        info, status = (
            {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"},
            "failed",
        )
    info.pop("ok_check", None)
    return {"case": name, "status": status, "seconds": round(time.perf_counter() - start, 1), **_peak(device), **info}


CASES = ("lora_bf16", "full_fp32_autocast", "qlora_nf4", "run_grpo_qlora")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: --device cuda but no CUDA GPU is visible; run with --device cpu", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    repo = Path(__file__).resolve().parents[2]
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        print(f"gpu_smoke: unknown case(s) {unknown}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memtrain-gpu-smoke-") as tmp:
        work = Path(tmp)
        tokenizer = build_tokenizer(work / "model")
        build_model(work / "model", tokenizer)
        bodies = {
            "lora_bf16": lambda: case_lora_bf16(work, args.device),
            "full_fp32_autocast": lambda: case_full_fp32_autocast(work, args.device),
            "qlora_nf4": lambda: case_qlora_nf4(work, args.device),
            "run_grpo_qlora": lambda: case_run_grpo(work, args.device, repo),
        }
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines: stdout holds the summary alone
            results = [run_case(name, bodies[name], args.device) for name in wanted]
    summary = {
        "gpu_smoke": "ok" if all(r["status"] in ("ok", "skipped") for r in results) else "failed",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "seconds": round(time.perf_counter() - started, 1),
        "versions": _versions(),
        "cases": results,
    }
    print(json.dumps(summary, default=str), flush=True)
    return 0 if summary["gpu_smoke"] == "ok" else 1


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
