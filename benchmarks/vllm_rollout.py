"""Rollout cost on real vLLM (the CPU build): the memory agent's loop vs one flat generate, and weight syncs per step.

Run in the vLLM venv (``make test-vllm`` builds it), 10-20 minutes on 2 cores (``--parts loop`` for one part):

    HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/vllm_rollout.py

Part ``loop`` (memtrain's ``VLLMGenerator`` on SmolLM2-135M-Instruct): the memory agent reads D documents x G
copies chunk by chunk, each prompt built from the previous step's memory, in two modes: ``barrier`` (one engine call
per step, every trajectory waiting for the slowest of its step: how a generator without streaming runs) and
``stream`` (each trajectory's next call submitted as its previous one returns, memtrain.agent.request_stream). After
each, the SAME prompts go to the engine in ONE flat ``generate``, each forced to the number of new tokens it had in
the loop; the prefix cache is reset before every loop and flat run, so neither reuses the other's prefill. ``loop_over_flat`` is what the sequential dependency costs.

Part ``sync`` (MemTrainer, TRL's colocated engine, sleep mode, SmolLM2): alternate steps run with memtrain's
``VLLMRolloutSession`` (one sync per optimizer step, calls streamed) and without it (TRL's own path, one generate per
agent call: with sleep mode every call re-syncs, since each call ends in a level-2 sleep).

Parts ``merged`` and ``adapter`` (MemTrainer, SmolLM2 + a LoRA adapter r = 16 on every linear layer, 2 steps): seconds
and bytes per sync with merged weights (TRL's way) or the adapter only (``vllm_lora_sync``), then the engine's time
per output token on one fixed workload, merged or through the adapter. Per step: syncs, seconds per sync, and the
share of the step spent syncing. The CPU shims of tests/vllm_real/cpu_shims.py are applied (vLLM's CPU backend needs them,
see there), and the engine runs eager (no torch.compile warm-up) to keep the run short.

Each part runs in its own child process (one engine each). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "vllm_real"))  # cpu_shims
sys.path.insert(0, str(ROOT / "tests"))  # conftest.save_built_documents
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
MODEL = "smollm2-135m"


def load_documents(folder: Path, count: int):
    """Built MemTrain documents (in a child process: numba must not be imported beside a vLLM CPU engine)."""
    from cpu_shims import build_documents_in_subprocess
    from datasets import Dataset

    if not folder.exists():
        build_documents_in_subprocess(folder, count, 300, 3)
    return Dataset.load_from_disk(str(folder))


# ---------------------------------------------------------------------------------------------- part: loop vs flat
def part_loop(
    docs: Path, documents: int, copies: int, chunks: int, memory_tokens: int, max_num_seqs: int | None = None
) -> dict:
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from memtrain.agent.generation import SamplingConfig
    from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
    from memtrain.agent.vllm_backend import VLLMGenerator
    from memtrain.models import resolve_model_path

    rows = list(load_documents(docs, documents))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MODEL))
    start = time.perf_counter()
    # No chunked prefill: vLLM's CPU build cannot rewind a seeded request's generator when a chunk's sample is
    # discarded ("CPU Generator does not use offset"), which a wide wave (--documents 16) would hit.
    generator = VLLMGenerator(
        model=MODEL, max_model_len=2048, seed=0, enforce_eager=True, max_num_batched_tokens=32768,
        **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}),
    )  # fmt: skip
    init_seconds = time.perf_counter() - start
    config = AgentConfig(
        chunk_size=128, max_chunks=chunks, max_problem_tokens=64, max_memory_tokens=memory_tokens, max_answer_tokens=16
    )
    agent = MemoryAgent(tokenizer, generator, config)
    contexts, problems = [r["context"] for r in rows], [r["prompt"] for r in rows]
    agent.rollout(contexts[:1], problems[:1], n=1, sampling=SamplingConfig(max_new_tokens=8, seed=0))  # warm-up

    def flat(calls) -> tuple[float, int]:
        """The same prompts in ONE generate, each forced to the number of new tokens it had in the loop."""
        prompts = [{"prompt_token_ids": list(call.prompt_ids)} for call in calls]
        lengths = [max(len(call.completion_ids), 1) for call in calls]
        params = [
            SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, seed=k, logprobs=0)
            for k, n in enumerate(lengths)
        ]
        generator.llm.reset_prefix_cache()  # the loop just computed these prompts: flat must not reuse them
        start = time.perf_counter()
        outputs = generator.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        assert tokens == sum(lengths), (tokens, sum(lengths))
        return seconds, tokens

    # "barrier": one engine call per agent step (every trajectory waits for the slowest of its step), the way every
    # generator without streaming runs; "stream": each trajectory's next call submitted as its previous one returns.
    results = {}
    runs: dict[str, list] = {"barrier": [], "stream": []}
    for repeat in range(2):
        for mode in ("barrier", "stream"):  # alternating, so drifts in machine load cancel
            generator.streaming = mode == "stream"
            sampling = SamplingConfig(max_new_tokens=memory_tokens, seed=10 + repeat)
            generator.llm.reset_prefix_cache()  # nor the loop the previous run's (same chunks, same first prompts)
            start = time.perf_counter()
            trajectories = agent.rollout(contexts, problems, n=copies, sampling=sampling)
            loop_seconds = time.perf_counter() - start
            calls = [call for t in trajectories for call in t.calls]
            flat_seconds, flat_tokens = flat(calls)
            runs[mode].append((loop_seconds, flat_seconds, calls, flat_tokens, generator.peak_sequences))
    for mode, measured in runs.items():
        loop_seconds, flat_seconds, calls, flat_tokens, peak = min(measured, key=lambda m: m[0] / m[1])
        new_tokens = sum(len(call.completion_ids) for call in calls)
        results[mode] = {
            "engine_calls": max(call.step for call in calls) if mode == "barrier" else 1,
            "prompts": len(calls),
            "new_tokens": new_tokens,
            # memory updates that ran to the budget: where all do, a step's calls end together and no barrier waits
            "updates_at_budget": round(
                statistics.mean(len(c.completion_ids) == memory_tokens for c in calls if c.kind == "update"), 2
            ),
            "prompt_tokens": sum(len(call.prompt_ids) for call in calls),
            "loop_s": round(loop_seconds, 3),
            "flat_s": round(flat_seconds, 3),
            "loop_over_flat": round(loop_seconds / flat_seconds, 2),
            "loop_tokens_per_s": round(new_tokens / loop_seconds, 1),
            "flat_tokens_per_s": round(flat_tokens / flat_seconds, 1),
            **({"peak_sequences": peak} if mode == "stream" else {}),
        }
    return {
        "engine_init_s": round(init_seconds, 1),
        "trajectories": len(contexts) * copies,
        **results,
        "barrier_over_stream_loop_over_flat": round(
            results["barrier"]["loop_over_flat"] / results["stream"]["loop_over_flat"], 2
        ),
    }


# ---------------------------------------------------------------------------------------------- the trainer parts
def answer_length_reward(completions, **kwargs) -> list[float]:
    """A reward with spread on any model (the answer's length), so every group trains."""
    return [float(len(text)) / 10 for text in completions]


@contextlib.contextmanager
def cpu_colocated_engine():
    """TRL's colocated engine on vLLM's CPU build: the sleep-mode shims of tests/vllm_real/cpu_shims.py, and an eager
    engine (no torch.compile warm-up). Yields the monkeypatch, undone on exit."""
    import pytest
    import trl.generation.vllm_generation as trl_vllm
    from cpu_shims import allow_cpu_sleep_mode

    with pytest.MonkeyPatch.context() as monkeypatch:
        allow_cpu_sleep_mode(monkeypatch)
        engine = trl_vllm.LLM
        monkeypatch.setattr(trl_vllm, "LLM", lambda *a, **k: engine(*a, **{**k, "enforce_eager": True}))
        yield monkeypatch


def benchmark_trainer(docs: Path, documents: int, steps: int, learning_rate: float, **options):
    """The MemTrainer every trainer part measures: SmolLM2, D documents x G2 = 2, 2 chunks of 128 tokens, memory 16,
    TRL's colocated engine in sleep mode. ``options``: ``callbacks``, ``peft_config`` and ``vllm_lora_sync``."""
    import memtrain.trainer as trainer_module
    from memtrain.agent.memory_agent import AgentConfig
    from memtrain.agent.recall import default_entity_tools
    from memtrain.configs import MemTrainConfig
    from memtrain.models import resolve_model_path
    from memtrain.rewards import REWARD_FUNCS

    args = MemTrainConfig(
        output_dir=tempfile.mkdtemp(prefix="vllm-bench-"), per_device_train_batch_size=4, num_generations=2,
        recall_samples=2, max_steps=steps, learning_rate=learning_rate, warmup_steps=0, beta=0.0,
        scale_rewards="none", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
        lenient_recall=True, max_tokens_per_microbatch=4096, reward_funcs=["answer_length_reward", "memory_recall"],
        reward_weights=[1.0, 0.5], use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True,
        vllm_max_model_length=2048, vllm_lora_sync=options.pop("vllm_lora_sync", False),
    )  # fmt: skip
    agent = AgentConfig(chunk_size=128, max_chunks=2, max_problem_tokens=64, max_memory_tokens=16, max_answer_tokens=8)
    return trainer_module.MemTrainer(
        model=resolve_model_path(MODEL), args=args, agent_config=agent, train_dataset=load_documents(docs, documents),
        entity_tools=default_entity_tools(), reward_funcs=[answer_length_reward, REWARD_FUNCS["memory_recall"]],
        **options,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- part: syncs per step
class _NoSession(contextlib.nullcontext):
    """Stands in for VLLMRolloutSession: TRL's own per-call path (sync after every level-2 sleep)."""

    def __init__(self, trainer) -> None:
        super().__init__()


def part_sync(docs: Path, documents: int, steps: int) -> dict:
    from transformers import TrainerCallback

    import memtrain.trainer as trainer_module
    from memtrain.trainer_engine import TrainerGenerator
    from memtrain.vllm_rollouts import VLLMRolloutSession, sync_counter

    streaming = TrainerGenerator.streaming
    records: list[dict] = []

    class StepClock(TrainerCallback):
        """Per optimizer step: wall seconds, syncs and sync seconds; the session is switched off halfway."""

        def on_step_begin(self, args, state, control, **kwargs):
            with_session = state.global_step % 2 == 0  # alternating, so drifts in machine load cancel
            monkeypatch.setattr(
                trainer_module, "VLLMRolloutSession", VLLMRolloutSession if with_session else _NoSession
            )
            # TRL's own path is one generate per agent call (a stream has no per-call sync to compare with)
            monkeypatch.setattr(
                TrainerGenerator, "streaming", streaming if with_session else property(lambda _: False)
            )
            self.session = with_session
            self.start = (time.perf_counter(), counter.count, counter.seconds)

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            t0, c0, s0 = self.start
            records.append(
                {
                    "session": self.session,
                    "step_s": now - t0,
                    "syncs": counter.count - c0,
                    "sync_s": counter.seconds - s0,
                }
            )

    with cpu_colocated_engine() as monkeypatch:
        start = time.perf_counter()
        trainer = benchmark_trainer(docs, documents, steps, learning_rate=1e-5, callbacks=[StepClock()])
        init_seconds = time.perf_counter() - start
        counter = sync_counter(trainer.vllm_generation)
        calls = trainer.generator.calls
        trainer.train()
        calls = (trainer.generator.calls - calls) / steps

    def summary(session: bool) -> dict:
        part = [r for r in records if r["session"] == session]
        syncs = sum(r["syncs"] for r in part)
        sync_s = sum(r["sync_s"] for r in part)
        step_s = sum(r["step_s"] for r in part)
        return {
            "steps": len(part),
            "syncs_per_step": syncs / len(part),
            "seconds_per_sync": round(sync_s / syncs, 3) if syncs else None,
            "step_s": round(statistics.mean(r["step_s"] for r in part), 2),
            "sync_share_of_step": round(sync_s / step_s, 3),
            "step_s_each": [round(r["step_s"], 2) for r in part],
            "syncs_each": [r["syncs"] for r in part],
        }

    with_session, without = summary(True), summary(False)
    return {
        "trainer_init_s": round(init_seconds, 1),
        "engine_calls_per_step": calls,
        "with_session": with_session,
        "without_session": without,
        "syncs_saved_per_step": without["syncs_per_step"] - with_session["syncs_per_step"],
        "step_time_without_over_with": round(without["step_s"] / with_session["step_s"], 2),
    }


# ---------------------------------------------------------------------------------------------- part: LoRA sync
def part_lora(docs: Path, documents: int, steps: int, adapter_only: bool) -> dict:
    """MemTrainer with a LoRA adapter (r = 16, every linear layer) on SmolLM2: merged-weight sync (TRL's way, the
    LoRA deltas merged out of place) or adapter-only sync (``vllm_lora_sync``); then the engine's output tokens/s on
    one fixed workload, served merged or through the adapter."""
    from peft import LoraConfig
    from vllm import SamplingParams

    from memtrain.vllm_rollouts import sync_counter

    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    with cpu_colocated_engine():
        trainer = benchmark_trainer(
            docs, documents, steps, learning_rate=1e-4, peft_config=lora, vllm_lora_sync=adapter_only
        )
        counter = sync_counter(trainer.vllm_generation)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        logs = [entry for entry in trainer.state.log_history if "vllm/sync_bytes" in entry]

        # decode speed on one fixed workload: 32 prompts x 64 forced tokens (the adapter goes in with every call)
        generation = trainer.vllm_generation
        generation.llm.wake_up()
        prompts = [{"prompt_token_ids": list(range(100 + k, 164 + k))} for k in range(32)]
        params = SamplingParams(max_tokens=64, min_tokens=64, ignore_eos=True, seed=0)
        generation.llm.generate(prompts[:2], sampling_params=params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = generation.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        decode_seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "sync": "adapter" if adapter_only else "merged",
        "syncs": counter.count,
        "seconds_per_sync": round(counter.seconds / counter.count, 3),
        "bytes_per_sync": int(statistics.mean(entry["vllm/sync_bytes"] for entry in logs)),
        "train_s": round(train_seconds, 1),
        "output_tokens_per_s": round(tokens / decode_seconds, 1),
        "ms_per_output_token": round(1000 * decode_seconds / tokens, 3),
    }


# ---------------------------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part", choices=["loop", "sync", "merged", "adapter"], help="run one part in this process (internal)"
    )
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--copies", type=int, default=2, help="rollouts per document (G1) in the loop part")
    parser.add_argument("--chunks", type=int, default=3, help="chunks read per document in the loop part")
    parser.add_argument(
        "--memory-tokens", type=int, default=32, help="memory budget in the loop part (larger: lengths vary more)"
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=None,
        help="the loop part's engine runs at most this many sequences at once, loop and flat alike (as a KV cache "
        "that holds that many would; default: vLLM's)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps in the sync part (every other one with the session)"
    )
    parser.add_argument(
        "--parts", nargs="+", default=["loop", "sync", "merged", "adapter"], help="parts to run (default: all)"
    )
    parser.add_argument("--docs", type=Path, default=None, help="folder of built documents (internal)")
    parser.add_argument("--out", type=Path, default=None, help="where a part writes its JSON (internal)")
    args = parser.parse_args()
    if args.part is not None:
        if args.part == "loop":
            result = part_loop(
                args.docs, args.documents, args.copies, args.chunks, args.memory_tokens, args.max_num_seqs
            )
        elif args.part == "sync":
            result = part_sync(args.docs, args.documents, args.steps)
        else:
            result = part_lora(args.docs, args.documents, 2, adapter_only=args.part == "adapter")
        args.out.write_text(json.dumps(result))
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="vllm-rollout-") as tmp:
        docs = Path(tmp) / "docs"
        load_documents(docs, args.documents)
        for part in args.parts:
            out = Path(tmp) / f"{part}.json"
            command = [sys.executable, __file__, "--part", part, "--docs", str(docs), "--out", str(out)]
            command += ["--documents", str(args.documents), "--copies", str(args.copies), "--chunks", str(args.chunks)]
            command += ["--steps", str(args.steps), "--memory-tokens", str(args.memory_tokens)]
            command += ["--max-num-seqs", str(args.max_num_seqs)] if args.max_num_seqs else []
            start = time.perf_counter()
            completed = subprocess.run(command, capture_output=True, text=True)
            if completed.returncode != 0:
                sys.exit(f"part {part} failed:\n{completed.stderr[-3000:]}")
            results[part] = json.loads(out.read_text())
            results[part]["wall_s"] = round(time.perf_counter() - start, 1)
            print(f"{part}: {json.dumps(results[part])}", flush=True)
    if "loop" in results:
        for mode in ("barrier", "stream"):
            m = results["loop"][mode]
            print(
                f"memory-agent loop, {mode}: {m['engine_calls']} engine call(s), {m['loop_s']} s vs one flat generate "
                f"of the same {m['prompts']} prompts / {m['new_tokens']} tokens: {m['flat_s']} s "
                f"(loop/flat {m['loop_over_flat']}x)"
            )
    if "sync" in results:
        for name in ("with_session", "without_session"):
            s = results["sync"][name]
            print(
                f"{name}: {s['syncs_per_step']} syncs/step, {s['seconds_per_sync']} s/sync, step {s['step_s']} s, "
                f"sync share {s['sync_share_of_step']}"
            )
    if "merged" in results and "adapter" in results:
        merged, adapter = results["merged"], results["adapter"]
        results["adapter_over_merged"] = {
            "seconds_per_sync": round(adapter["seconds_per_sync"] / merged["seconds_per_sync"], 3),
            "bytes_per_sync": round(adapter["bytes_per_sync"] / merged["bytes_per_sync"], 4),
            "ms_per_output_token": round(adapter["ms_per_output_token"] / merged["ms_per_output_token"], 2),
        }
        print(f"adapter-only vs merged sync: {json.dumps(results['adapter_over_merged'])}")
    print(json.dumps({"benchmark": "vllm_rollout", "vllm": _vllm_version(), "model": MODEL, **results}))


def _vllm_version() -> str:
    from memtrain.vllm_rollouts import installed_vllm_version

    return str(installed_vllm_version())


if __name__ == "__main__":
    main()
