"""MemTrainer's training tokens per second as a ratio to plain TRL ``GRPOTrainer`` (goal >= 0.9).

    python benchmarks/trainer.py                          # SmolLM2-135M, fp32, CPU: 2 docs x 2 rollouts x 2 chunks
    python benchmarks/trainer.py --device cuda --docs 4 --group 4 --chunks 4 --chunk-size 512 --memory-tokens 128

What is compared (the TRAINING part of a step only; generation is done once, before, and is not timed):

1. Real memory-agent rollouts of the shipped Wikipedia sample (``MemoryAgent`` + ``TransformersGenerator``; every
   completion forced to exactly ``--memory-tokens`` tokens) give one training sequence per model call: exactly the
   prompt the call was generated from plus its completion (MemTrain's multi-conversation rows).
2. MemTrainer: ``trainer._backward_rows(model, rows)`` (token-budget packing, collation, forward, PPO-clip loss,
   backward) + ``optimizer.step()`` + ``zero_grad()``.
3. TRL: the same sequences as ONE ``GRPOTrainer`` batch in TRL's own layout (prompts left-padded, completions
   right-padded, the dict ``_generate_and_score_completions`` hands to the loss), ``trainer.compute_loss`` +
   ``accelerator.backward`` + ``optimizer.step()`` + ``zero_grad()``.

Both trainers get their own copy of the same weights, the same ``GRPOConfig`` optimizer settings (AdamW, learning
rate, weight decay), gradient checkpointing (TRL's default: on), beta = 0, temperature 1, the same advantages and a
token-mean loss (TRL ``dapo`` = sum / completion tokens; MemTrainer ``token_mean``). The two are timed alternately
(order flipped every repeat) so load from other processes hits both alike; warm-up repeats are dropped and the median
is reported. "Trained tokens" are completion tokens; the prompt tokens every sequence is conditioned on are the same
for both and printed alongside.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from memtrain.agent.generation import SamplingConfig, TransformersGenerator  # noqa: E402
from memtrain.agent.memory_agent import AgentConfig, MemoryAgent  # noqa: E402
from memtrain.agent.prompts import MEMTRAIN_PROBLEM  # noqa: E402
from memtrain.configs import MemTrainConfig  # noqa: E402
from memtrain.grpo import TrainingRow, assign_loss_weights, collate_rows, pack_micro_batches  # noqa: E402
from memtrain.models import load_model_and_tokenizer  # noqa: E402
from memtrain.trainer import MemTrainer  # noqa: E402


def wiki_contexts(tokenizer, docs: int, tokens: int) -> list[str]:
    """``docs`` real texts of at least ``tokens`` tokens: consecutive paragraphs of the shipped Wikipedia sample."""
    from memtrain.data.corpus import builtin_corpus_path, load_corpus

    paragraphs = [p["text"] for p in load_corpus(str(builtin_corpus_path("wiki-sample")), limit=400)]
    contexts, cursor = [], 0
    for _ in range(docs):
        blocks: list[str] = []
        while cursor < len(paragraphs):
            blocks.append(f"Document {len(blocks) + 1}:\n{paragraphs[cursor]}")
            cursor += 1
            text = "\n\n".join(blocks)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= tokens:
                contexts.append(text)
                break
        else:
            raise ValueError(f"the Wikipedia sample is too short for {docs} documents of {tokens} tokens")
    return contexts


def rollout_rows(model, tokenizer, args: argparse.Namespace) -> list[TrainingRow]:
    """One TrainingRow per model call of real rollouts; advantages +1 / -1 alternate within each document's group."""
    config = AgentConfig(
        chunk_size=args.chunk_size,
        max_chunks=args.chunks,
        max_memory_tokens=args.memory_tokens,
        max_answer_tokens=args.memory_tokens,
    )
    sampling = SamplingConfig(max_new_tokens=args.memory_tokens, temperature=1.0, seed=args.seed)
    generator = TransformersGenerator(model, tokenizer, sampling, min_new_tokens=args.memory_tokens)
    agent = MemoryAgent(tokenizer, generator, config)
    contexts = wiki_contexts(tokenizer, args.docs, args.chunk_size * args.chunks)
    model.eval()
    trajectories = agent.rollout(contexts, [MEMTRAIN_PROBLEM] * args.docs, n=args.group)
    rows = []
    for i, trajectory in enumerate(trajectories):
        advantage = 1.0 if i % 2 == 0 else -1.0
        for call in trajectory.calls:
            rows.append(TrainingRow(list(call.prompt_ids), list(call.completion_ids), advantage, call.kind, i))
    assign_loss_weights(rows, "token_mean")
    return rows


def length_reward(completions, **kwargs) -> list[float]:
    """Never called in the timed part; both trainers need a reward function to be built."""
    return [float(len(c)) for c in completions]


def common_settings(args: argparse.Namespace, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        num_generations=2,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        weight_decay=0.0,
        beta=0.0,
        temperature=1.0,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=False,
        fp16=False,
        seed=args.seed,
        max_steps=1,
    )


def build_trainers(model, tokenizer, args: argparse.Namespace, output_dir: str) -> tuple[MemTrainer, GRPOTrainer]:
    dataset = Dataset.from_dict({"prompt": ["unused"] * 4, "context": ["unused"] * 4, "answers": [["x"]] * 4})
    memtrain = MemTrainer(
        model=copy.deepcopy(model),
        args=MemTrainConfig(
            **common_settings(args, output_dir + "/memtrain"),
            reward_funcs=["length_reward"],
            max_tokens_per_microbatch=args.max_tokens_per_microbatch,
            trajectory_html_steps=0,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )
    trl = GRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=[length_reward],
        args=GRPOConfig(**common_settings(args, output_dir + "/trl"), loss_type="dapo"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    for trainer in (memtrain, trl):
        trainer.create_optimizer()
        trainer.model.train()
        # The Trainer loop sets this at the start of each accumulation window; one window of one micro-step here.
        trainer.current_gradient_accumulation_steps = 1
    return memtrain, trl


def memtrain_step(trainer: MemTrainer, rows: list[TrainingRow]) -> Callable[[], None]:
    def step() -> None:
        trainer._backward_rows(trainer.model, rows, "train")
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def trl_step(trainer: GRPOTrainer, rows: list[TrainingRow], pad_token_id: int) -> Callable[[], None]:
    """TRL's training step body on the dict its generation phase produces (built here, outside the timing)."""
    batch = collate_rows(rows, pad_token_id, trainer.accelerator.device)
    inputs = {key: batch[key] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    inputs["advantages"] = batch["advantages"]
    inputs["num_items_in_batch"] = batch["completion_mask"].sum()

    def step() -> None:
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, inputs)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="Model to load (memtrain.models).")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--docs", type=int, default=2, help="B: documents.")
    parser.add_argument("--group", type=int, default=2, help="G1: rollouts per document.")
    parser.add_argument("--chunks", type=int, default=2, help="T: chunks per document.")
    parser.add_argument("--chunk-size", type=int, default=48, help="Tokens per chunk.")
    parser.add_argument("--memory-tokens", type=int, default=16, help="Tokens of every memory update and answer.")
    parser.add_argument("--max-tokens-per-microbatch", type=int, default=16384, help="MemTrainer's token budget.")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--warmup", type=int, default=1, help="Untimed repeats of each trainer.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats of each trainer.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, gradient_checkpointing=False)
    model.to(args.device)
    print(
        f"model={args.model} device={args.device} dtype={dtype} torch_threads={torch.get_num_threads()} "
        f"cpu={platform.processor() or platform.machine()} load={os.getloadavg()[0]:.2f} torch={torch.__version__}"
    )
    start = time.perf_counter()
    rows = rollout_rows(model, tokenizer, args)
    completion_tokens = sum(len(r.completion_ids) for r in rows)
    prompt_tokens = sum(len(r.prompt_ids) for r in rows)
    longest = max(r.num_tokens for r in rows)
    print(
        f"rows: {len(rows)} sequences from {args.docs} docs x {args.group} rollouts x ({args.chunks} updates + 1 "
        f"final), rollout {time.perf_counter() - start:.1f} s (untimed); {completion_tokens} trained (completion) "
        f"tokens + {prompt_tokens} prompt tokens, longest sequence {longest}; padded batch "
        f"{len(rows)} x {max(len(r.prompt_ids) for r in rows) + max(len(r.completion_ids) for r in rows)} (TRL), "
        f"{len(pack_micro_batches(rows, args.max_tokens_per_microbatch))} micro-batch(es) (MemTrainer)"
    )

    with tempfile.TemporaryDirectory() as output_dir:
        memtrain, trl = build_trainers(model, tokenizer, args, output_dir)
        steps = {
            "MemTrainer": memtrain_step(memtrain, rows),
            "TRL GRPOTrainer": trl_step(trl, rows, tokenizer.pad_token_id),
        }
        times: dict[str, list[float]] = {name: [] for name in steps}
        for repeat in range(args.warmup + args.repeats):
            order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
            for name in order:
                seconds = timed(steps[name], args.device)
                label = "warm-up" if repeat < args.warmup else "timed"
                print(f"  repeat {repeat} ({label}) {name}: {seconds:.2f} s", flush=True)
                if repeat >= args.warmup:
                    times[name].append(seconds)

    print(f"{'trainer':<16} {'median s/step':>13} {'min s':>8} {'max s':>8} {'trained tok/s':>14} {'all tok/s':>10}")
    rates = {}
    for name, values in times.items():
        median = statistics.median(values)
        rates[name] = completion_tokens / median
        print(
            f"{name:<16} {median:>13.3f} {min(values):>8.3f} {max(values):>8.3f} {rates[name]:>14.1f} "
            f"{(completion_tokens + prompt_tokens) / median:>10.1f}"
        )
    ratio = rates["MemTrainer"] / rates["TRL GRPOTrainer"]
    print(
        f"MemTrainer / TRL GRPOTrainer training tokens/s = {ratio:.2f}  (goal >= 0.9; median of {args.repeats} "
        f"repeats after {args.warmup} warm-up)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
