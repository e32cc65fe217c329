"""What one MemTrain training step costs, before/after shared-prompt rows and the sliced log-prob head.

    python benchmarks/step_cost.py                     # SmolLM2-135M, fp32, CPU, G1 = 8, G2 = 8, 2 chunks
    python benchmarks/step_cost.py --chunks 3 --chunk-size 512 --with-ner

The rows are a step's rows at the paper's proportions scaled to this CPU (PAPER.md sections 4-5: G1 = 8 rollouts of
a document, G2 = 8 recall answers per probe, prompts long relative to answers): for one document, the G1 first
memory updates (one shared prompt: problem + empty memory + chunk 1), the later updates (a prompt per rollout), the
final answers and one recall probe per rollout (memory + masked chunk, shared by its G2 answers). Token ids are real
Wikipedia text through the SmolLM2 tokenizer; completions are forced to the memory/answer budgets.

1. The step (forward + backward of every row, token-budget micro-batches), each variant in a fresh process:
   before = rows one by one in TRL's layout and a log-softmax over all kept logits (the trainer until now);
   after = rows sharing a prompt packed into one sequence (:mod:`memtrain.shared_prompts`) and the sliced head
   (:mod:`memtrain.logprob_head`). Printed: forward tokens (positions the model runs, padding included), step
   seconds (median of --repeats after a warm-up) and peak RSS above the loaded model, as after/before ratios.
2. The head alone at Qwen's 152,064-token vocabulary (hidden 896, Qwen2.5-0.5B's): forward + backward of the
   log-probs of --head-positions positions, plain vs sliced, peak RSS in fresh processes.
3. With --with-ner, benchmarks/recall_entities.py in a subprocess (NER seconds per step before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN_VOCAB, QWEN_05B_HIDDEN = 152_064, 896


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def step_rows(tokenizer, args) -> list:
    """One document's rows as a MemTrain step makes them (see the module docstring)."""
    from memtrain.data.corpus import builtin_corpus_path, load_corpus
    from memtrain.grpo import TrainingRow

    text = " ".join(p["text"] for p in load_corpus(str(builtin_corpus_path("wiki-sample")), limit=200))
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    cursor = 0

    def take(n: int) -> list[int]:
        nonlocal cursor
        cursor += n
        return stream[cursor - n : cursor]

    g1, g2 = args.rollouts, args.recall_samples
    problem, chunks = take(args.problem_tokens), [take(args.chunk_size) for _ in range(args.chunks)]
    memories = [[take(args.memory_tokens) for _ in range(g1)] for _ in range(args.chunks)]
    rows = [TrainingRow(problem + chunks[0], take(args.memory_tokens), 1.0, "memory", i) for i in range(g1)]
    for step in range(1, args.chunks):
        rows += [
            TrainingRow(problem + memories[step - 1][i] + chunks[step], take(args.memory_tokens), 1.0, "memory", i)
            for i in range(g1)
        ]
    rows += [TrainingRow(problem + memories[-1][i], take(args.answer_tokens), 1.0, "final", i) for i in range(g1)]
    for i in range(g1):
        probe = memories[i % args.chunks][i] + chunks[i % args.chunks]
        rows += [TrainingRow(probe, take(args.answer_tokens), 0.5, "recall", g1 + i * g2 + k) for k in range(g2)]
    for row in rows:
        row.weight = 1.0 / len(rows)
    return rows


def _plain_row_logps(model, rows, pad):
    from memtrain.grpo import collate_rows
    from memtrain.logprob_head import plain_logprobs

    batch = collate_rows(rows, pad)
    ids = torch_cat(batch["prompt_ids"], batch["completion_ids"])
    mask = torch_cat(batch["prompt_mask"], batch["completion_mask"])
    keep = batch["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                   logits_to_keep=keep + 1).logits  # fmt: skip
    logps, _ = plain_logprobs(logits[:, :-1], batch["completion_ids"])
    return logps * batch["completion_mask"], ids.numel()


def torch_cat(left, right):
    import torch

    return torch.cat([left, right], dim=1)


def run_step(variant: str, args) -> dict:
    import torch

    from memtrain.grpo import pack_micro_batches
    from memtrain.models import load_model_and_tokenizer
    from memtrain.shared_prompts import score_rows, shared_prompt_batch, shared_prompt_micro_batches

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype=torch.float32, gradient_checkpointing=True)
    rows = step_rows(tokenizer, args)
    pad = tokenizer.pad_token_id
    model.train()
    baseline = _peak_rss_mb()

    def step() -> int:
        tokens = 0
        if variant == "before":
            for micro in pack_micro_batches(rows, args.max_tokens):
                logps, n = _plain_row_logps(model, micro, pad)
                (-(logps.sum(1) * torch.tensor([r.weight for r in micro])).sum()).backward()
                tokens += n
        else:
            for micro in shared_prompt_micro_batches(rows, args.max_tokens):
                logps, _ = score_rows(model, model, micro, pad, 1.0, "cpu")
                (-(logps.sum(1) * torch.tensor([r.weight for r in micro])).sum()).backward()
                tokens += shared_prompt_batch(micro, pad).inputs["input_ids"].numel()
        model.zero_grad(set_to_none=True)
        return tokens

    times = []
    for repeat in range(args.repeats + 1):
        start = time.perf_counter()
        tokens = step()
        if repeat:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return {"tokens": tokens, "seconds": statistics.median(times), "peak_mb": _peak_rss_mb() - baseline,
            "rows": len(rows)}  # fmt: skip


def run_head(variant: str, args) -> dict:
    import torch

    from memtrain.logprob_head import plain_logprobs, sliced_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(QWEN_05B_HIDDEN, QWEN_VOCAB, bias=False)
    hidden = torch.randn(args.head_positions, QWEN_05B_HIDDEN, requires_grad=True)
    targets = torch.randint(0, QWEN_VOCAB, (args.head_positions,))
    baseline = _peak_rss_mb()
    start = time.perf_counter()
    if variant == "before":
        logps, _ = plain_logprobs(head(hidden), targets)
    else:
        logps, _ = sliced_logprobs(hidden, head, targets)
    logps.sum().backward()
    return {"seconds": time.perf_counter() - start, "peak_mb": _peak_rss_mb() - baseline}


def _child(part: str, variant: str, argv: list[str]) -> dict:
    command = [sys.executable, __file__, *argv, "--child", f"{part}:{variant}"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=8, help="G1")
    parser.add_argument("--recall-samples", type=int, default=8, help="G2")
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=160)
    parser.add_argument("--problem-tokens", type=int, default=32)
    parser.add_argument("--memory-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=2048, help="max_tokens_per_microbatch")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--head-positions", type=int, default=3360,
        help="positions the head scores: 0.41 x 8192, the completion share of qwen-7b.yaml's worst micro-batch",
    )  # fmt: skip
    parser.add_argument("--with-ner", action="store_true", help="also run benchmarks/recall_entities.py")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        part, variant = args.child.split(":")
        print(json.dumps((run_step if part == "step" else run_head)(variant, args)))
        return

    argv = [a for a in sys.argv[1:] if a != "--with-ner"]
    step = {variant: _child("step", variant, argv) for variant in ("before", "after")}
    b, a = step["before"], step["after"]
    print(f"step: {b['rows']} rows (G1 = {args.rollouts}, G2 = {args.recall_samples}, {args.chunks} chunks of "
          f"{args.chunk_size} tokens), SmolLM2-135M fp32 on CPU, micro-batch budget {args.max_tokens} tokens")  # fmt: skip
    print(f"{'':24}{'before':>12}{'after':>12}{'after/before':>14}")
    for label, key, fmt in (("forward tokens", "tokens", "{:.0f}"), ("step seconds", "seconds", "{:.2f}"),
                            ("peak RSS over model, MB", "peak_mb", "{:.0f}")):  # fmt: skip
        print(f"{label:24}{fmt.format(b[key]):>12}{fmt.format(a[key]):>12}{a[key] / b[key]:>14.2f}")

    head = {variant: _child("head", variant, argv) for variant in ("before", "after")}
    b, a = head["before"], head["after"]
    print(f"\nhead: log-probs of {args.head_positions} positions at a {QWEN_VOCAB:,}-token vocabulary, fp32, "
          "forward + backward")  # fmt: skip
    print(f"{'':24}{'plain':>12}{'sliced':>12}{'sliced/plain':>14}")
    print(f"{'peak RSS, MB':24}{b['peak_mb']:>12.0f}{a['peak_mb']:>12.0f}{a['peak_mb'] / b['peak_mb']:>14.2f}")
    print(f"{'seconds':24}{b['seconds']:>12.2f}{a['seconds']:>12.2f}{a['seconds'] / b['seconds']:>14.2f}")

    if args.with_ner:
        print("\nNER (benchmarks/recall_entities.py):", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("recall_entities.py"))], check=True)


if __name__ == "__main__":
    main()
