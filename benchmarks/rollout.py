"""How much the batched memory loop costs compared with raw batched generation, and how much batching saves.

    python benchmarks/rollout.py                       # SmolLM2-135M, B=2 documents x G=4 rollouts x T=3 chunks
    python benchmarks/rollout.py --docs 4 --group 8 --chunks 4 --chunk-size 512 --memory-tokens 128

Three timings over exactly the same prompts and token counts (every completion is forced to ``--memory-tokens``
tokens: EOS is forbidden until then, and answers get the same budget as memories):

* loop: ``MemoryAgent.rollout`` over B documents x G rollouts, T update steps + 1 final step, one ``generate``
  call per step (T + 1 calls in all);
* flat: ONE batched ``generate`` over all B x G x (T + 1) prompts the loop produced; a lower bound the loop
  cannot reach (its steps depend on each other), so ``loop / flat`` is the price of reading sequentially;
* sequential: the same rollouts one trajectory at a time (batch 1), the loop batching replaces.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from memtrain.agent.generation import GenerationOutput, SamplingConfig, TransformersGenerator  # noqa: E402
from memtrain.agent.memory_agent import AgentConfig, MemoryAgent  # noqa: E402
from memtrain.models import load_model_and_tokenizer  # noqa: E402


TOPICS = ["the Rhone", "Lyon", "the Alps", "Geneva", "the Saone", "Marseille", "Avignon", "Arles"]


def synthetic_context(tokenizer, doc: int, tokens: int) -> str:
    """A deterministic, Wikipedia-like text of at least ``tokens`` tokens, different for each document."""
    sentences, index = [], 0
    while True:
        topic = TOPICS[(doc * 3 + index) % len(TOPICS)]
        sentences.append(
            f"Document {doc}, paragraph {index}: {topic} was described in {1800 + 7 * index + doc} by a traveller "
            f"who counted {11 * index + doc} bridges and {3 * index + 2} churches along the way."
        )
        index += 1
        text = " ".join(sentences)
        if index % 8 == 0 and len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= tokens:
            return text


@dataclass
class TimedGenerator:
    """The real generator, with the time spent inside it and the prompts it received."""

    inner: TransformersGenerator
    seconds: float = 0.0
    calls: int = 0

    @property
    def sampling(self) -> SamplingConfig:
        return self.inner.sampling

    def generate(self, prompt_ids, n=1, sampling=None) -> GenerationOutput:
        start = time.perf_counter()
        output = self.inner.generate(prompt_ids, n=n, sampling=sampling)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="Model to load (memtrain.models).")
    parser.add_argument("--docs", type=int, default=2, help="B: documents per batch.")
    parser.add_argument("--group", type=int, default=4, help="G: rollouts per document.")
    parser.add_argument("--chunks", type=int, default=3, help="T: chunks per document.")
    parser.add_argument("--chunk-size", type=int, default=128, help="Tokens per chunk.")
    parser.add_argument("--memory-tokens", type=int, default=32, help="Tokens per memory update and per answer.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--skip-sequential", action="store_true", help="Skip the slow one-at-a-time baseline.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    config = AgentConfig(
        chunk_size=args.chunk_size,
        max_chunks=args.chunks,
        max_memory_tokens=args.memory_tokens,
        max_answer_tokens=args.memory_tokens,
    )
    sampling = SamplingConfig(max_new_tokens=args.memory_tokens, temperature=1.0, seed=args.seed)
    generator = TransformersGenerator(model, tokenizer, sampling, min_new_tokens=args.memory_tokens)
    contexts = [synthetic_context(tokenizer, doc, args.chunk_size * args.chunks) for doc in range(args.docs)]
    problems = [f"How many bridges did the traveller of document {doc} count?" for doc in range(args.docs)]
    batch = args.docs * args.group
    print(
        f"model={args.model} device={model.device} dtype={model.dtype} torch_threads={torch.get_num_threads()} "
        f"cpu={platform.processor() or platform.machine()} load={os.getloadavg()[0]:.2f}"
    )
    print(
        f"B={args.docs} docs x G={args.group} rollouts x T={args.chunks} chunks (+1 final step); "
        f"chunk={args.chunk_size} tokens; every completion exactly {args.memory_tokens} tokens"
    )

    warm = MemoryAgent(tokenizer, generator, config)
    warm.rollout(contexts[:1], problems[:1], n=1)  # first-call allocations and kernel selection out of the timings

    timed = TimedGenerator(generator)
    agent = MemoryAgent(tokenizer, timed, config)
    start = time.perf_counter()
    trajectories = agent.rollout(contexts, problems, n=args.group)
    loop = time.perf_counter() - start
    assert all(t.num_chunks == args.chunks for t in trajectories), "the synthetic contexts must fill T chunks"
    assert all(len(c.completion_ids) == args.memory_tokens for t in trajectories for c in t.calls)
    prompts = [call.prompt_ids for t in trajectories for call in t.calls]
    generated = sum(len(call.completion_ids) for t in trajectories for call in t.calls)
    prompt_tokens = sum(len(p) for p in prompts)
    print(
        f"loop:       {loop:8.2f} s  ({timed.calls} generate calls for {len(prompts)} prompts, {prompt_tokens} prompt "
        f"tokens, {generated} generated; {timed.seconds / loop:.1%} of it inside generate)"
    )

    flat_start = time.perf_counter()
    flat_output = generator.generate(prompts, n=1, sampling=sampling)
    flat = time.perf_counter() - flat_start
    assert sum(len(ids) for ids in flat_output.completion_ids) == generated
    print(f"flat:       {flat:8.2f} s  (ONE generate over the same {len(prompts)} prompts and token counts)")
    print(f"loop / flat = {loop / flat:.2f}  (goal <= 1.15)")

    if not args.skip_sequential:
        start = time.perf_counter()
        for doc in range(args.docs):
            for sample in range(args.group):
                one = SamplingConfig(max_new_tokens=args.memory_tokens, seed=args.seed * 1000 + doc * 100 + sample)
                agent.rollout([contexts[doc]], [problems[doc]], n=1, sampling=one)
        sequential = time.perf_counter() - start
        print(f"sequential: {sequential:8.2f} s  ({batch} rollouts one at a time, batch 1)")
        print(f"speed-up of the batched loop over one-at-a-time = {sequential / loop:.2f}x  (goal >= 3x at B*G=8)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
