"""Throughput of the reward functions on memory-agent-sized replies (they run on the trainer's critical path).

Usage: python benchmarks/rewards.py [--n 4096] [--reply-chars 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import string
import time

from memtrain.rewards import get_reward_funcs


def make_batch(n: int, reply_chars: int, seed: int) -> tuple[list, list[list[str]]]:
    """Replies of ``reply_chars`` random words, a third of them boxed, half of them in chat format."""
    rng = random.Random(seed)
    completions, answers = [], []
    for i in range(n):
        words = []
        while sum(len(w) + 1 for w in words) < reply_chars:
            words.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))))
        gold = " ".join(words[-2:])
        text = " ".join(words)
        if i % 3 == 0:
            text += f" so the answer is \\boxed{{{gold.upper()}}}."
        completions.append([{"role": "assistant", "content": text}] if i % 2 else text)
        answers.append([gold, "other"])
    return completions, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--reply-chars", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    completions, answers = make_batch(args.n, args.reply_chars, args.seed)
    names = ["masked_entity_em", "masked_entity_em_lenient", "answer_em", "answer_sub_em_lenient", "answer_f1_lenient"]
    print(f"{args.n} replies of ~{args.reply_chars} characters")
    for name, func in zip(names, get_reward_funcs(names)):
        start = time.perf_counter()
        rewards = func(completions, answers=answers)
        elapsed = time.perf_counter() - start
        mean = sum(r for r in rewards if r is not None) / len(rewards)
        print(f"{name:26s} {elapsed * 1e3:8.1f} ms  {args.n / elapsed:10.0f} replies/s  mean reward {mean:.3f}")


if __name__ == "__main__":
    main()
