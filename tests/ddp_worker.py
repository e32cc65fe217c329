"""Run by tests/test_trainer.py under `torchrun --nproc_per_node 2`: MemTrainer with DDP (gloo) on CPU.

The two processes get documents of different lengths, so their memory loops make different numbers of generator
calls; the run must neither deadlock nor diverge. Each process writes what it did to <out>/rank<i>.json.
"""

import json
import sys
from pathlib import Path

from conftest import build_tiny_model
from datasets import Dataset
from transformers import AutoTokenizer

from memtrain.agent.memory_agent import AgentConfig
from memtrain.configs import MemTrainConfig
from memtrain.data.corpus import builtin_corpus_path, load_corpus
from memtrain.rewards import REWARD_FUNCS
from memtrain.trainer import MemTrainer


# logged values that must be the global ones (the ranks read documents of different lengths, so local ones differ)
GATHERED = ("chunks/mean", "memory_tokens/mean", "recall_accuracy", "recall_groups_filtered", "entropy",
            "clip_ratio/region_mean", "rows_trained", "reward")  # fmt: skip


def answer_length_reward(completions, **kwargs):
    return [len(text) / 10 for text in completions]


def main(tokenizer_dir: str, out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    paragraphs = load_corpus(str(builtin_corpus_path("wiki-sample")), limit=40).paragraphs
    # rank 0 reads 1-paragraph documents, rank 1 reads 6-paragraph ones (the sampler hands out contiguous slices)
    rows = [
        {"prompt": "Which entity is [MASK]?", "context": "\n\n".join(p["text"] for p in paragraphs[i : i + size]),
         "answers": [paragraphs[i]["title"]], "id": str(i)}
        for i, size in enumerate([1, 6])
    ]  # fmt: skip
    args = MemTrainConfig(
        output_dir=str(Path(out) / "run"), per_device_train_batch_size=2, num_generations=2, recall_samples=2,
        max_steps=2, learning_rate=1e-2, warmup_steps=0, beta=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, reward_funcs=["answer_length_reward", "memory_recall"], reward_weights=[1.0, 0.5],
        trajectory_html_steps=0, lenient_recall=True, shuffle_dataset=False, seed=0,
    )  # fmt: skip
    agent = AgentConfig(chunk_size=32, max_chunks=6, max_memory_tokens=8, max_answer_tokens=6)
    trainer = MemTrainer(
        model=build_tiny_model(tokenizer), args=args, agent_config=agent, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, reward_funcs=[answer_length_reward, REWARD_FUNCS["memory_recall"]],
    )  # fmt: skip
    trainer.train()
    rank = trainer.accelerator.process_index
    checksum = sum(float(p.detach().double().sum()) for p in trainer.model.parameters())
    report = {
        "world_size": trainer.accelerator.num_processes, "global_step": trainer.state.global_step,
        "generator_calls": trainer.generator.calls, "checksum": checksum,
        "rows_trained": [h["rows_trained"] for h in trainer.state.log_history if "rows_trained" in h],
        "logged": [{k: h.get(k) for k in GATHERED} for h in trainer.state.log_history if "rows_trained" in h],
    }  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
