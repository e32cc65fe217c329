"""Run by tests/test_trainer.py and tests/test_trainer_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

The two processes get documents of different lengths, so their memory loops make different numbers of generator
calls and their steps have different numbers of rows; the run must neither deadlock nor diverge. Every scoring
forward (``MemTrainer._row_logps``) also runs one all-reduce here, standing in for the parameter all-gather FSDP and
ZeRO-3 run in each forward: a path whose processes run different numbers of forwards hangs (a gloo timeout) instead
of passing by luck under DDP, whose forwards need no collective. Each process writes what it did to
<out>/rank<i>.json.

Modes: ``train`` (2 steps, log_completions on), ``iterations`` (num_iterations 2), ``generation``
(steps_per_generation 2), ``eval`` (an evaluation after the step), ``vllm`` (a real colocated vLLM CPU engine per
process, tensor-parallel size 1), ``vllm-tp`` / ``vllm-tp-lora`` / ``vllm-tp-regex`` (one colocated engine split
over both processes, tensor-parallel size 2; with adapter-only sync; with a structured-outputs regex) and
``vllm-server`` (a running ``trl vllm-serve``, adapter-only sync): the vLLM modes run from tests/vllm_real only.
"""

import importlib.util
import json
import os
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path


# Not tests/ on sys.path (a script's folder is put first): a folder there named like a package (tests/vllm/) would
# shadow it; the tiny model is read from conftest.py by its path.
TESTS = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != TESTS]
_spec = importlib.util.spec_from_file_location("memtrain_test_conftest", TESTS / "conftest.py")
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
build_tiny_model = _conftest.build_tiny_model

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from memtrain.agent.memory_agent import AgentConfig  # noqa: E402
from memtrain.agent.request_stream import StreamRequest  # noqa: E402
from memtrain.configs import MemTrainConfig  # noqa: E402
from memtrain.data.corpus import builtin_corpus_path, load_corpus  # noqa: E402
from memtrain.rewards import REWARD_FUNCS  # noqa: E402
from memtrain.trainer import MemTrainer  # noqa: E402


# logged values that must be the global ones (the ranks read documents of different lengths, so local ones differ)
GATHERED = ("chunks/mean", "memory_tokens/mean", "recall_accuracy", "recall_groups_filtered", "entropy",
            "clip_ratio/region_mean", "rows_trained", "reward")  # fmt: skip
EVAL_GATHERED = ("eval_loss", "eval_reward", "eval_rows_trained", "eval_entropy", "eval_chunks/mean")

MODES = {
    # mode: (paragraphs per document, in dataset order; config overrides)
    "train": ([1, 6], {"log_completions": True, "num_completions_to_print": 2, "max_tokens_per_microbatch": 1}),
    "iterations": ([1, 6], {"num_iterations": 2, "max_tokens_per_microbatch": 1}),
    # a generation batch is 2 steps' rollouts: 4 documents, ranks 0 and 1 get two each (contiguous slices)
    "generation": ([1, 1, 6, 6], {"steps_per_generation": 2, "max_tokens_per_microbatch": 1}),
    "eval": ([1, 6], {"max_steps": 1, "eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 2,
                      "max_tokens_per_microbatch": 1}),
    "vllm": ([1, 6], {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 1024,
                      "max_tokens_per_microbatch": 1}),
    # one engine over both processes: every generation call is a round of the tensor-parallel group
    "vllm-tp": ([1, 6], {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 1024,
                         "vllm_tensor_parallel_size": 2, "max_tokens_per_microbatch": 1}),
    # the same with a structured-outputs regex, which TRL builds per call: rounds of the group instead of a stream
    "vllm-tp-regex": ([1, 6], {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 1024,
                               "vllm_tensor_parallel_size": 2, "vllm_structured_outputs_regex": "[A-Za-z ]+",
                               "max_tokens_per_microbatch": 1}),
    # the same with a LoRA adapter synced alone (vllm_lora_sync): each process publishes it to its own engine worker
    "vllm-tp-lora": ([1, 6], {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 1024,
                              "vllm_tensor_parallel_size": 2, "vllm_lora_sync": True,
                              "max_tokens_per_microbatch": 1}),
    # a running `trl vllm-serve` (URL and served checkpoint from the environment) and a LoRA adapter synced to it
    "vllm-server": ([1, 6], {"use_vllm": True, "vllm_mode": "server", "vllm_lora_sync": True,
                             "vllm_server_timeout": 60, "max_tokens_per_microbatch": 1}),
}  # fmt: skip


def answer_length_reward(completions, **kwargs):
    """The answer's length, ties broken by its characters: two random answers of one length would filter a group."""
    return [len(text) / 10 + 1e-3 * (sum(map(ord, text)) % 100) for text in completions]


def count_collective_forwards(trainer: MemTrainer) -> Counter:
    """Count every scoring forward by path, each running one all-reduce (FSDP's gather, in miniature)."""
    forwards: Counter = Counter()
    row_logps = trainer._row_logps

    def collective_row_logps(model, rows):
        dist.all_reduce(torch.ones(1))
        path = "train" if torch.is_grad_enabled() else ("eval" if not trainer.model.training else "old_logps")
        forwards[path] += 1
        return row_logps(model, rows)

    trainer._row_logps = collective_row_logps
    return forwards


def record_generation_rounds(trainer: MemTrainer) -> list[list[int]]:
    """Each generation call's (prompts, token budget, filler prompts among them), in call order."""
    rounds: list[list[int]] = []
    generate = trainer._generate_single_turn
    filler = trainer.generator._filler_prompt

    def recording_generate(prompts, images, multimodal_fields, num_generations, *args, **kwargs):
        fillers = sum(list(prompt) == filler for prompt in prompts)
        rounds.append([len(prompts), int(trainer.max_completion_length), fillers])
        return generate(prompts, images, multimodal_fields, num_generations, *args, **kwargs)

    trainer._generate_single_turn = recording_generate
    return rounds


def count_decoded_tokens(trainer: MemTrainer) -> Counter:
    """Tokens the engine decoded (``engine``: every finished request of every engine step, which in a tensor-parallel
    group holds the whole group's requests), tokens this process's agents received (``agents``), completions longer
    than their call's budget (``over_budget``), and this process's streams (``streams``, joins included)."""
    counts: Counter = Counter()
    engine, generator, vllm = trainer.vllm_generation.llm.llm_engine, trainer.generator, trainer.vllm_generation
    engine_step, agent_generate, agent_stream, vllm_stream = (
        engine.step,
        generator.generate,
        generator.stream,
        vllm.stream,
    )

    def counting_engine_step(*args, **kwargs):
        outputs = engine_step(*args, **kwargs)
        counts["engine"] += sum(len(c.token_ids) for output in outputs if output.finished for c in output.outputs)
        return outputs

    def receive(completion_ids: list[list[int]], budget: int) -> None:
        counts["agents"] += sum(len(c) for c in completion_ids)
        counts["over_budget"] += sum(len(c) > budget for c in completion_ids)

    def counting_agent_generate(prompt_ids, n=1, sampling=None):
        output = agent_generate(prompt_ids, n, sampling)
        if not generator.streaming:  # a stream's requests are counted as they finish
            receive(output.completion_ids, sampling.max_new_tokens)
        return output

    def counting(request: StreamRequest) -> StreamRequest:
        def on_done(output):
            receive(output.completion_ids, request.sampling.max_new_tokens)
            return [counting(follow_up) for follow_up in request.on_done(output)]

        return replace(request, on_done=on_done)

    def counting_vllm_stream(requests):
        counts["streams"] += 1
        return vllm_stream(requests)

    engine.step, generator.generate = counting_engine_step, counting_agent_generate
    generator.stream = lambda requests: agent_stream([counting(r) for r in requests])
    vllm.stream = counting_vllm_stream
    return counts


def generate_like_fsdp(trainer: MemTrainer) -> None:
    """transformers ``generate`` with ``synced_gpus``, as under FSDP (where an FSDP-managed model turns it on): every
    decoding step all-reduces whether all processes are done, so the processes' calls must pair up one to one, and a
    process whose rows are done keeps joining the other's forwards. A call left unpaired hangs (a gloo timeout)."""
    model = trainer.model
    generate = model.generate
    model.generate = lambda *args, **kwargs: generate(*args, **{**kwargs, "synced_gpus": True})


def record_gradient_syncs(trainer: MemTrainer) -> list[bool]:
    """Whether DDP all-reduced each backward (False inside no_sync), in call order."""
    syncs: list[bool] = []
    backward = trainer.accelerator.backward

    def recording_backward(loss, **kwargs):
        syncs.append(bool(trainer.model_wrapped.require_backward_grad_sync))
        return backward(loss, **kwargs)

    trainer.accelerator.backward = recording_backward
    return syncs


def serve_from_checkpoint(model, tokenizer, folder: Path) -> str:
    """The model saved for vLLM to load (head size 32, as vLLM's CPU attention needs), served in float32 like the
    CPU trainer (TRL passes no dtype and vLLM would downcast to bf16; see vllm_real/cpu_shims.serve_float32)."""
    import trl.generation.vllm_generation as trl_vllm

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    engine = trl_vllm.LLM
    trl_vllm.LLM = lambda *args, **kwargs: engine(*args, **{**kwargs, "dtype": "float32"})
    return str(folder)


def main(tokenizer_dir: str, out: str, mode: str = "train") -> None:
    sizes, overrides = MODES[mode]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    paragraphs = load_corpus(str(builtin_corpus_path("wiki-sample")), limit=40).paragraphs
    # short documents on rank 0, long ones on rank 1 (the sampler hands out contiguous slices)
    rows = [
        {"prompt": "Which entity is [MASK]?", "context": "\n\n".join(p["text"] for p in paragraphs[i : i + size]),
         "answers": [paragraphs[i]["title"]], "id": str(i)}
        for i, size in enumerate(sizes)
    ]  # fmt: skip
    settings = dict(
        output_dir=str(Path(out) / "run"), per_device_train_batch_size=2, num_generations=2, recall_samples=2,
        max_steps=2, learning_rate=1e-2, warmup_steps=0, beta=0.0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, reward_funcs=["answer_length_reward", "memory_recall"],
        reward_weights=[1.0, 0.5], trajectory_html_steps=0, lenient_recall=True, shuffle_dataset=False, seed=0,
        ddp_timeout=60,  # a hang fails within a minute
    )  # fmt: skip
    settings.update(overrides)
    agent = AgentConfig(chunk_size=32, max_chunks=6, max_memory_tokens=8, max_answer_tokens=6)
    model = build_tiny_model(tokenizer)
    peft_config = None
    if settings.get("vllm_lora_sync"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    if mode == "vllm-server":
        settings["vllm_server_base_url"] = os.environ["MEMTRAIN_TEST_SERVER_URL"]
        model = os.environ["MEMTRAIN_TEST_SERVED_MODEL"]
    elif settings.get("use_vllm"):
        model = serve_from_checkpoint(build_tiny_model(tokenizer, hidden_size=128), tokenizer, Path(out) / "tiny")
    trainer = MemTrainer(
        model=model, args=MemTrainConfig(**settings), agent_config=agent,
        train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows) if mode == "eval" else None,
        processing_class=tokenizer, reward_funcs=[answer_length_reward, REWARD_FUNCS["memory_recall"]],
        peft_config=peft_config,
    )  # fmt: skip
    forwards = count_collective_forwards(trainer)
    syncs = record_gradient_syncs(trainer)
    rounds = record_generation_rounds(trainer)
    decoded = count_decoded_tokens(trainer) if mode.startswith("vllm-tp") else Counter()
    if not settings.get("use_vllm"):
        generate_like_fsdp(trainer)
    trainer.train()
    rank = trainer.accelerator.process_index
    checksum = sum(float(p.detach().double().sum()) for p in trainer.model.parameters())
    history = trainer.state.log_history

    # the decision for a micro-batch before the last, on this real 2-process accelerator: DDP defers the
    # all-reduce (no_sync), FSDP reduce-scatters every micro-batch (Accelerate runs FSDP on GPUs only)
    def defers(fsdp: bool) -> bool:
        trainer.is_fsdp_enabled = fsdp
        return type(trainer._micro_batch_context(trainer.model_wrapped, last=False)).__name__ != "nullcontext"

    ddp_no_sync, fsdp_no_sync = defers(False), defers(True)
    report = {
        "world_size": trainer.accelerator.num_processes, "global_step": trainer.state.global_step,
        "generator_calls": trainer.generator.calls, "checksum": checksum, "forwards": dict(forwards),
        "syncs": syncs, "rounds": rounds, "decoded": dict(decoded), "ddp_no_sync": ddp_no_sync, "fsdp_no_sync": fsdp_no_sync,
        "rows_trained": [h["rows_trained"] for h in history if "rows_trained" in h],
        "logged": [{k: h.get(k) for k in GATHERED} for h in history if "rows_trained" in h],
        "sampling": [{k: h.get(f"sampling/{k}") for k in ("importance_sampling_ratio/mean", "sampling_logp_difference/max")}
                     for h in history if "rows_trained" in h],
        "eval_logged": [{k: h.get(k) for k in EVAL_GATHERED} for h in history if "eval_loss" in h],
    }  # fmt: skip
    if mode == "vllm-server":  # the model name this process's own requests named last
        report["served_model"] = trainer.vllm_generation._process_client().model
        report["own_client"] = trainer.vllm_generation._own_client is not None
    if mode == "train" and trainer.accelerator.is_main_process:
        import pandas as pd

        tables = sorted(Path(settings["output_dir"], "completions").glob("*.parquet"))
        frames = [pd.read_parquet(t) for t in tables]
        report["completions"] = [{"columns": list(f.columns), "memories": f["memories"].tolist()} for f in frames]
    Path(out, f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
