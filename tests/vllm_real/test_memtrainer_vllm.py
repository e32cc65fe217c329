"""Two real MemTrainer steps through TRL's colocated vLLM engine (CPU build), sleep mode on.

Every model call of a step (memory updates, final answers, recall answers) is streamed into TRL's real ``vllm.LLM``
(external launcher, in process), each submitted as soon as its input exists. Checked: one weight sync per
optimizer step whatever the number of calls, and that the synced engine samples from the policy being trained:
TRL's importance-sampling statistics (vLLM's sampling log-probs against the trainer's) stay at ratio ~1 in step 2,
after the optimizer has moved the weights.
"""

from __future__ import annotations

import math

import pytest
from cpu_shims import build_documents_in_subprocess, save_tiny_llama, tiny_memtrainer


AGENT = dict(chunk_size=48, max_chunks=2, max_problem_tokens=64, max_memory_tokens=8, max_answer_tokens=6)


def answer_length_reward(completions, **kwargs) -> list[float]:
    """A reward with spread on a random model (the answer's length), so every group trains."""
    return [float(len(text)) / 10 for text in completions]


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    from datasets import Dataset

    folder = build_documents_in_subprocess(tmp_path_factory.mktemp("docs") / "docs", 2, 300, 7)
    return Dataset.load_from_disk(str(folder))


def test_two_steps_one_sync_each_and_importance_sampling_logged(trl_colocate_on_cpu, documents, tmp_path):
    from memtrain.vllm_rollouts import sync_counter

    trainer = tiny_memtrainer(
        save_tiny_llama(tmp_path / "tiny"), tmp_path, documents, answer_length_reward, AGENT,
        vllm_mode="colocate", vllm_enable_sleep_mode=True, vllm_max_model_length=1024,
    )  # fmt: skip
    assert type(trainer.vllm_generation.llm).__name__ == "LLM"  # a real engine, not a stand-in
    counter = sync_counter(trainer.vllm_generation)
    calls_before = trainer.generator.calls
    trainer.train()

    # 2 chunk steps + the final answer + the recall answers, all streamed into the engine as they become possible:
    # one stream per step (the documents carry their entities, so the probes ride in it), one sync each step
    # (every sync_weights call counts, whoever makes it).
    assert trainer.generator.streaming
    assert trainer.generator.calls - calls_before == 2
    assert all(t.answer is not None and len(t.calls) == 3 for t in trainer._last_trajectories)
    assert counter.count == 2
    logs = [entry for entry in trainer.state.log_history if "vllm/weight_syncs" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    assert [entry["vllm/weight_syncs"] for entry in logs] == [1.0, 1.0]
    for entry in logs:
        ratio = entry["sampling/importance_sampling_ratio/mean"]
        assert math.isfinite(ratio) and entry["vllm/sync_seconds"] > 0
        # the stream's concurrency: 2 trajectories of one sequence, at most 2 probes of 2 answers beside them
        assert 1 <= entry["vllm/peak_sequences"] <= 2 + 2 * 2, entry["vllm/peak_sequences"]
        # vLLM sampled from the weights being trained (fp32 both sides): log-probs agree, the IS ratio is 1.
        difference = entry["sampling/sampling_logp_difference/mean"]
        assert abs(ratio - 1.0) < 1e-3 and difference < 1e-3, (entry["step"], ratio, difference)


def test_adapter_only_sync_moves_the_adapter_and_never_the_base(trl_colocate_on_cpu, documents, tmp_path):
    """vllm_lora_sync (issue 22): the engine loads the base once with LoRA enabled; each of 2 optimizer steps writes
    only the adapter (its exact byte count crosses, nothing else), the base's load_weights is never called again, and
    the engine samples from the policy being trained (fp32: vLLM's sampling log-probs equal the trainer's)."""
    from memtrain.vllm_rollouts import sync_counter

    trainer = tiny_memtrainer(
        save_tiny_llama(tmp_path / "tiny"), tmp_path, documents, answer_length_reward, AGENT, lora=True,
        learning_rate=5e-2, vllm_mode="colocate", vllm_enable_sleep_mode=True, vllm_max_model_length=1024,
        vllm_lora_sync=True,
    )  # fmt: skip
    generation = trainer.vllm_generation
    worker = generation.llm.llm_engine.model_executor.driver_worker.worker
    served = worker.model_runner.get_model()
    base_loads = []
    load_weights = served.load_weights
    served.load_weights = lambda weights: base_loads.append(1) or load_weights(weights)
    requests = []
    publish = generation._adapters.publish
    generation._adapters.publish = lambda *a, **k: requests.append(publish(*a, **k)) or requests[-1]
    adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    adapter_bytes = sum(t.numel() * 4 for t in adapter.values())  # fp32 engine: the adapter crosses in fp32
    counter = sync_counter(generation)
    trainer.train()

    assert counter.count == 2 and base_loads == []  # two adapter syncs; the base never pushed again
    assert [r.lora_int_id for r in requests] == [1, 2] and len({r.lora_path for r in requests}) == 2
    assert generation._lora_request is requests[-1]
    logs = [entry for entry in trainer.state.log_history if "vllm/sync_bytes" in entry]
    assert [entry["vllm/sync_bytes"] for entry in logs] == [float(adapter_bytes)] * 2
    moved = [n for n, p in trainer.model.named_parameters() if n in adapter and not p.detach().equal(adapter[n])]
    assert moved  # step 2 served an adapter the optimizer had changed
    for entry in logs:
        ratio = entry["sampling/importance_sampling_ratio/mean"]
        difference = entry["sampling/sampling_logp_difference/mean"]
        assert abs(ratio - 1.0) < 1e-3 and difference < 1e-3, (entry["step"], ratio, difference)


def test_colocated_engines_generate_alone_across_processes(smollm2_tokenizer_dir, tmp_path):
    """2 processes (torchrun, gloo), a colocated engine each at tensor-parallel size 1 (every vLLM recipe's setting):
    a generation call is no collective, so each process generates only its own prompts, as often as its own
    documents need: no rounds padded with filler prompts decoding to the budget, no process waiting for another.
    The scoring forwards stay in lockstep and the weights equal (issue 22)."""
    from test_trainer_distributed import run_workers

    first, second = run_workers(smollm2_tokenizer_dir, tmp_path, "vllm", timeout=900)
    assert first["global_step"] == second["global_step"] == 2
    # rank 0 reads 1-paragraph documents, rank 1 6-paragraph ones: each process streams its own calls into its own
    # engine (one stream per step), none through a collective generation round padded with fillers
    assert first["rounds"] == second["rounds"] == []
    assert first["generator_calls"] == second["generator_calls"] == 2
    assert first["forwards"] == second["forwards"]
    assert first["checksum"] == pytest.approx(second["checksum"], rel=1e-6)


@pytest.mark.parametrize("mode", ["vllm-tp", "vllm-tp-lora", "vllm-tp-regex"])
def test_a_tensor_parallel_group_decodes_only_what_its_processes_asked_for(mode, smollm2_tokenizer_dir, tmp_path):
    """2 processes (torchrun, gloo) sharing one colocated engine at tensor-parallel size 2 (vLLM's CPU build under
    TRL's external launcher), whose workers must run identical engine calls. Streamed (``vllm-tp``, and
    ``vllm-tp-lora`` with adapter-only sync): the processes stream together, each its own requests, sharing after
    every engine step the follow-ups their finished requests made, so no process waits for another's agent calls.
    With a structured-outputs regex (``vllm-tp-regex``, which TRL builds per call) every call is a round of the
    group, each process its own prompts at its own budget. Either way the engine decodes exactly the tokens the
    agents receive: TRL's equal rounds pad the shorter process with filler prompts decoding to the group's largest
    budget (688 tokens decoded for 440 received, issue 22)."""
    from test_trainer_distributed import run_workers

    first, second = run_workers(smollm2_tokenizer_dir, tmp_path, mode, timeout=900)
    assert first["global_step"] == second["global_step"] == 2
    assert first["checksum"] == pytest.approx(second["checksum"], rel=1e-6)
    decoded = first["decoded"], second["decoded"]
    assert decoded[0]["engine"] == decoded[1]["engine"] == decoded[0]["agents"] + decoded[1]["agents"], decoded
    assert decoded[0]["over_budget"] == decoded[1]["over_budget"] == 0, decoded
    if mode != "vllm-tp-regex":
        # one stream per step on each process and no generation round, though rank 1's documents are 6 times longer
        assert first["rounds"] == second["rounds"] == []
        assert decoded[0]["streams"] == decoded[1]["streams"] == first["generator_calls"] == 2
        # each process scored its own completions' engine log-probs, from this step's weights (or adapter)
        for entry in first["sampling"]:
            assert abs(entry["importance_sampling_ratio/mean"] - 1.0) < 1e-3, entry
            assert entry["sampling_logp_difference/max"] < 1e-3, entry
    else:
        assert first["generator_calls"] != second["generator_calls"]  # rank 0's documents are shorter
        assert len(first["rounds"]) == len(second["rounds"])  # every call is a round of the group
        for rounds in (first["rounds"], second["rounds"]):
            assert not any(fillers for _, _, fillers in rounds), rounds
        assert any(mine[1] != theirs[1] for mine, theirs in zip(first["rounds"], second["rounds"]))  # own budgets
