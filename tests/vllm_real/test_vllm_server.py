"""Server mode on CPU: TRL's ``vllm-serve`` command on loopback, memtrain's ``VLLMServerGenerator`` driving the memory agent.

Generation through the server works on vLLM's CPU build; TRL's merged weight sync to a server does not (its client
refuses a non-CUDA device: the NCCL weight-transfer engine). Adapter-only sync (``vllm_lora_sync``) needs no NCCL: the
adapter crosses as files loaded through the server's runtime LoRA endpoints, so MemTrainer runs in server mode here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cpu_shims import trl_vllm_serve


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``trl vllm-serve`` for the packaged SmolLM2, stopped after the module."""
    from memtrain.models import resolve_model_path

    log = Path(tmp_path_factory.mktemp("server")) / "server.log"
    with trl_vllm_serve(resolve_model_path("smollm2-135m"), log) as base_url:
        yield base_url


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


def test_a_server_without_runtime_lora_loading_is_refused_with_the_command_that_starts_one(server):
    from trl.generation.vllm_client import VLLMClient

    from memtrain.preflight import PreflightError
    from memtrain.vllm_lora_sync import ServedAdapter

    served = ServedAdapter(VLLMClient(base_url=server, connection_timeout=30), "org/base", 16)
    with pytest.raises(PreflightError, match="cannot load LoRA adapters at runtime") as refused:
        served.serve("memtrain-policy-v1", "/dev/shm/none")
    assert (
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 trl vllm-serve --model org/base --enable-lora --max-lora-rank 16"
        in str(refused.value)
    )


SERVER_AGENT = dict(chunk_size=48, max_chunks=2, max_problem_tokens=64, max_memory_tokens=8, max_answer_tokens=6)


def answer_length_reward(completions, **kwargs) -> list[float]:
    """A reward with spread on a random model (the answer's length, ties broken by its characters), so every group
    trains: the server samples unseeded, and two answers of one length would filter a group."""
    return [len(text) / 10 + 1e-3 * (sum(map(ord, text)) % 100) for text in completions]


def test_adapter_only_sync_in_server_mode_loads_each_steps_adapter_into_the_server(tmp_path):
    """Server mode with vllm_lora_sync (issue 22): ``trl vllm-serve`` with runtime LoRA loading serves the base; each
    of 2 MemTrainer steps loads only the adapter into it (its exact bytes; no NCCL group, no weight pushed), every
    request generates through the newest adapter (the IS ratio stays 1: the server's log-probs are the trainer's),
    and the server keeps only that one loaded."""
    import requests
    from cpu_shims import build_documents_in_subprocess, save_tiny_llama, tiny_memtrainer
    from datasets import Dataset

    from memtrain.preflight import PreflightError
    from memtrain.vllm_rollouts import sync_counter

    checkpoint = str(save_tiny_llama(tmp_path / "tiny"))
    documents = Dataset.load_from_disk(str(build_documents_in_subprocess(tmp_path / "docs", 2, 300, 7)))
    runtime_lora = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    lora_args = ["--enable-lora", "--max-lora-rank", "8"]
    with trl_vllm_serve(checkpoint, tmp_path / "server.log", lora_args, runtime_lora) as base_url:
        trainer = tiny_memtrainer(
            checkpoint, tmp_path, documents, answer_length_reward, SERVER_AGENT, lora=True, learning_rate=5e-2,
            vllm_mode="server", vllm_server_base_url=base_url, vllm_server_timeout=60, vllm_lora_sync=True,
        )  # fmt: skip
        generation = trainer.vllm_generation
        client = generation.vllm_client
        assert client.communicator is None  # no NCCL weight-transfer group (CPU could not open one anyway)
        client.update_named_params = lambda *a, **k: pytest.fail("weights pushed to the server")
        assert client.model == "memtrain-policy-v1"  # the initial adapter, loaded when the trainer started
        adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
        counter = sync_counter(generation)
        trainer.train()

        assert counter.count == 2 and client.model == "memtrain-policy-v3"
        served = [m["id"] for m in requests.get(f"{base_url}/v1/models", timeout=30).json()["data"]]
        assert served == [checkpoint, "memtrain-policy-v3"], served  # the previous adapters were unloaded
        logs = [entry for entry in trainer.state.log_history if "vllm/sync_bytes" in entry]
        assert [entry["vllm/sync_bytes"] for entry in logs] == [float(adapter_bytes)] * 2
        assert any(not p.detach().equal(adapter[n]) for n, p in trainer.model.named_parameters() if n in adapter)
        for entry in logs:
            ratio = entry["sampling/importance_sampling_ratio/mean"]
            difference = entry["sampling/sampling_logp_difference/mean"]
            assert abs(ratio - 1.0) < 1e-3 and difference < 1e-3, (entry["step"], ratio, difference)

        # a folder the server cannot read: refused with what the server said and the fix
        with pytest.raises(PreflightError, match="refused the adapter in /dev/shm/none .*on a machine that sees"):
            generation._served_adapter.serve("memtrain-policy-missing", "/dev/shm/none")


def test_server_mode_processes_send_their_own_requests_with_no_rounds(smollm2_tokenizer_dir, tmp_path, monkeypatch):
    """2 processes (torchrun, gloo) against one ``trl vllm-serve`` with adapter-only sync (issue 22): each process sends
    its own requests from its own client, streamed, so no call is a collective round padded with filler prompts,
    though rank 0 reads 1-paragraph documents and rank 1 6-paragraph ones. After each sync both processes name the
    adapter the main process loaded; the weights stay equal."""
    from cpu_shims import save_tiny_llama
    from test_trainer_distributed import run_workers

    checkpoint = str(save_tiny_llama(tmp_path / "tiny"))
    runtime_lora = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    lora_args = ["--enable-lora", "--max-lora-rank", "8"]
    with trl_vllm_serve(checkpoint, tmp_path / "server.log", lora_args, runtime_lora) as base_url:
        monkeypatch.setenv("MEMTRAIN_TEST_SERVER_URL", base_url)
        monkeypatch.setenv("MEMTRAIN_TEST_SERVED_MODEL", checkpoint)
        first, second = run_workers(smollm2_tokenizer_dir, tmp_path, "vllm-server", timeout=900)
    assert first["global_step"] == second["global_step"] == 2
    assert first["rounds"] == second["rounds"] == []  # no call went through TRL's gathering server path
    assert first["generator_calls"] == second["generator_calls"] == 2  # one stream per step on each process
    assert (first["own_client"], second["own_client"]) == (False, True)  # rank 1 has a client of its own
    assert first["served_model"] == second["served_model"] == "memtrain-policy-v3"
    assert first["forwards"] == second["forwards"]
    assert first["checksum"] == pytest.approx(second["checksum"], rel=1e-6)
