"""memtrain's own in-process vLLM backend (``VLLMGenerator``) for real: the packaged SmolLM2-135M-Instruct on vLLM's
CPU build, driven by the memory agent's loop (one engine call per step, each on the previous step's memory)."""

from __future__ import annotations

import pytest
from cpu_shims import build_documents_in_subprocess


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    from datasets import Dataset

    folder = build_documents_in_subprocess(tmp_path_factory.mktemp("docs") / "docs", 2, 300, 11)
    return Dataset.load_from_disk(str(folder))


@pytest.fixture(scope="module")
def generator():
    import bm25s  # noqa: F401 - a BM25 index's numba/llvmlite loaded first, as in a search run (vllm_kernel_scan)

    from memtrain.agent.vllm_backend import VLLMGenerator

    # float32: vLLM downcasts a float32 checkpoint to bf16 under dtype="auto"; the comparison below is exact in fp32.
    engine = VLLMGenerator(model="smollm2-135m", max_model_len=2048, seed=0, dtype="float32", enforce_eager=True)
    yield engine
    shutdown = getattr(engine.llm.llm_engine.engine_core, "shutdown", None)
    if shutdown is not None:  # stop the engine's core process now, not at interpreter exit
        shutdown()


def hf_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    """log_softmax of the raw logits at each completion token, by transformers (the trainer's side of the ratio)."""
    import torch

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


def test_memory_agent_rollout_on_vllm_with_raw_logprobs(generator, documents):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memtrain.agent.generation import SamplingConfig
    from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
    from memtrain.models import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AgentConfig(
        chunk_size=160, max_chunks=2, max_problem_tokens=64, max_memory_tokens=24, max_answer_tokens=12
    )
    agent = MemoryAgent(tokenizer, generator, config)
    sampling = SamplingConfig(max_new_tokens=24, seed=5)
    rows = list(documents)
    trajectories = agent.rollout([r["context"] for r in rows], [r["prompt"] for r in rows], n=2, sampling=sampling)

    assert len(trajectories) == 4
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    worst = 0.0
    for trajectory in trajectories:
        kinds = [call.kind for call in trajectory.calls]
        assert kinds == ["update"] * trajectory.num_chunks + ["final"]
        for call in trajectory.calls:
            budget = config.max_memory_tokens if call.kind == "update" else config.max_answer_tokens
            assert 0 < len(call.completion_ids) <= budget
            assert call.logprobs is not None and len(call.logprobs) == len(call.completion_ids)
            assert all(lp <= 0.0 for lp in call.logprobs)
            expected = hf_logprobs(reference, call.prompt_ids, call.completion_ids)
            worst = max(worst, max(abs(a - b) for a, b in zip(call.logprobs, expected)))
        # Each step reads the previous step's memory: the update at step t+1 was prompted with memory t.
        for step, call in enumerate(trajectory.calls[1:], start=1):
            memory = trajectory.memories[step]
            if memory:
                assert memory in tokenizer.decode(call.prompt_ids)
    # vLLM's raw log-probs (fp32, CPU) are the model's own: they match transformers' forward pass.
    assert worst < 1e-3, worst

    # A seeded rollout is reproducible on the engine, and a group's copies sample differently.
    again = agent.rollout([r["context"] for r in rows], [r["prompt"] for r in rows], n=2, sampling=sampling)
    assert [t.calls[0].completion_ids for t in again] == [t.calls[0].completion_ids for t in trajectories]
    assert trajectories[0].calls[0].completion_ids != trajectories[1].calls[0].completion_ids


def test_a_trajectory_calls_again_as_soon_as_its_call_returns(generator, documents):
    """No step barrier: on the engine each trajectory's next call is submitted when its previous one returns, so a
    later step's call starts while an earlier step's call of another trajectory still runs (one engine call per
    step would never do that). Probes given as follow-ups run in the same stream, and the KV-cache bound holds."""
    from transformers import AutoTokenizer

    from memtrain.agent.generation import SamplingConfig
    from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
    from memtrain.agent.request_stream import StreamRequest
    from memtrain.agent.vllm_backend import kv_cache_tokens
    from memtrain.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    config = AgentConfig(chunk_size=96, max_chunks=3, max_problem_tokens=64, max_memory_tokens=48, max_answer_tokens=8)
    agent = MemoryAgent(tokenizer, generator, config)
    engine = generator.llm.llm_engine
    events: list[tuple[str, str]] = []
    prompts: dict[str, tuple[int, ...]] = {}
    add_request, step = engine.add_request, engine.step

    def recording_add(request_id, prompt, params, **kwargs):
        prompts[request_id] = tuple(prompt["prompt_token_ids"])
        events.append(("add", request_id))
        return add_request(request_id, prompt, params, **kwargs)

    def recording_step():
        outputs = step()
        events.extend(("finish", o.request_id) for o in outputs if o.finished)
        return outputs

    probes: list = []

    def after_update(index, trajectory):
        def on_done(output):
            probes.append((index, output))
            return []

        prompt = agent.encode_chat(f"Repeat this memory: {trajectory.memories[-1]}")
        return [StreamRequest(prompt, 2, SamplingConfig(max_new_tokens=4), on_done, key=index)]

    engine.add_request, engine.step = recording_add, recording_step
    try:
        rows = list(documents)
        trajectories = agent.prepare([r["context"] for r in rows], [r["prompt"] for r in rows], n=2)
        agent.run(trajectories, n=2, sampling=SamplingConfig(seed=7), after_update=after_update)
    finally:
        engine.add_request, engine.step = add_request, step

    step_of = {tuple(call.prompt_ids): call.step for t in trajectories for call in t.calls}
    running: set[str] = set()
    overtaken = 0  # calls started while a call of an EARLIER step (another trajectory's) still ran
    for kind, request_id in events:
        if kind == "finish":
            running.discard(request_id)
            continue
        step_now = step_of.get(prompts[request_id])
        if step_now is not None and any(step_of.get(prompts[r], 99) < step_now for r in running):
            overtaken += 1
        running.add(request_id)
    assert overtaken > 0, "every call waited for the slowest call of the step before it"
    assert all([c.kind for c in t.calls] == ["update"] * t.num_chunks + ["final"] for t in trajectories)
    assert len(probes) == sum(t.num_chunks for t in trajectories) and all(
        len(o.completion_ids) == 2 for _, o in probes
    )
    assert 0 < generator.peak_sequences and kv_cache_tokens(generator.llm) > 0


def test_the_stream_admits_no_more_than_the_kv_budget_holds(generator):
    """Admission bounded by KV tokens: with room for one request at a time, never two sequences' requests at once."""
    from vllm import SamplingParams

    from memtrain.agent.generation import SamplingConfig
    from memtrain.agent.request_stream import StreamRequest
    from memtrain.agent.vllm_backend import stream_on_engine

    done: list[int] = []

    def request(key: int) -> StreamRequest:
        return StreamRequest(
            [1, 2, 3, 4], 2, SamplingConfig(max_new_tokens=4), lambda out: done.append(key) or [], key
        )

    def params_of(r: StreamRequest):
        return SamplingParams(n=r.n, max_tokens=r.sampling.max_new_tokens, seed=r.key, logprobs=0)

    one = 2 * (4 + 4)
    assert stream_on_engine(generator.llm, [request(k) for k in range(3)], params_of, token_budget=one) == 2
    assert stream_on_engine(generator.llm, [request(k) for k in range(3)], params_of, token_budget=3 * one) == 6
    assert sorted(done) == [0, 0, 1, 1, 2, 2]
