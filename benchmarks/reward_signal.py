"""How much reward signal a model gets from the MemTrain objectives at a given setting (before any training).

GRPO learns only from groups whose rewards differ. This prints, for CPU-sized MemTrain documents, the final
masked-entity rate, the recall rate per chunk policy with the groups that have any spread, and the recall rate with a
perfect memory (the unmasked chunk itself) at several temperatures, with how often the gold string appears anywhere in
the answer (a containment reward would see that much).

    python scripts/build_dataset.py recipes/data/memtrain-wiki-cpu.yaml
    python benchmarks/reward_signal.py --docs 6 --group 4     # ~15 min on 2 CPU cores

Measured (SmolLM2-135M, defaults): final 0/24; recall (latest) 0% EM, 0% contained, 0/24 groups with spread; perfect
memory: EM 0% at temperature 1.0 / 0.5 / greedy, gold contained 2.1% / 4.2% / 12.5%.
"""

from __future__ import annotations

import argparse

from datasets import load_from_disk

from memtrain.agent.generation import SamplingConfig, TransformersGenerator
from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
from memtrain.agent.recall import build_recall_probes, default_entity_tools
from memtrain.metrics import masked_entity_match
from memtrain.models import load_model_and_tokenizer
from memtrain.rewards import recall_em


def rates(texts: list[str], golds: list[str], group: int) -> tuple[float, float, int, int]:
    """(lenient EM rate, gold-contained rate, groups with spread, groups)."""
    scores = [recall_em(text, gold, lenient=True) for text, gold in zip(texts, golds)]
    contained = [gold.lower() in text.lower() for text, gold in zip(texts, golds)]
    groups = [scores[i : i + group] for i in range(0, len(scores), group)]
    return (
        sum(scores) / len(scores),
        sum(contained) / len(contained),
        sum(len(set(g)) > 1 for g in groups),
        len(groups),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="outputs/data/memtrain-wiki-cpu/dataset")
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--group", type=int, default=4, help="G1 rollouts per document and G2 answers per probe")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--memory-tokens", type=int, default=64)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.5, 0.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = load_from_disk(args.dataset).select(range(args.docs))
    model, tokenizer = load_model_and_tokenizer(args.model)
    generator = TransformersGenerator(model, tokenizer, SamplingConfig(temperature=1.0, seed=args.seed))
    config = AgentConfig(
        chunk_size=args.chunk_size, max_chunks=args.chunks, max_problem_tokens=64,
        max_memory_tokens=args.memory_tokens, max_answer_tokens=args.answer_tokens,
    )  # fmt: skip
    agent = MemoryAgent(tokenizer, generator, config)
    trajectories = agent.rollout(rows["context"], rows["prompt"], n=args.group)
    final = [masked_entity_match(t.answer, rows[t.group]["answers"], lenient=True) for t in trajectories]
    print(f"{args.model}: {args.docs} documents x {args.group} rollouts, chunk {args.chunk_size} x {args.chunks}")
    print(f"final masked entity (lenient, temperature 1): {sum(final)}/{len(final)}")

    find_entities, mask_entity = default_entity_tools()
    answer = SamplingConfig(max_new_tokens=args.answer_tokens, temperature=1.0, seed=args.seed + 1)
    for policy in ("latest", "any"):
        probes = [p for p in build_recall_probes(trajectories, find_entities, mask_entity, policy, args.seed) if p]
        golds = [p.entity for p in probes for _ in range(args.group)]
        memories = [agent.templates.render_recall(p.memory, p.masked_chunk) for p in probes]
        texts = tokenizer.batch_decode(
            generator.generate([agent.encode_chat(m) for m in memories], n=args.group, sampling=answer).completion_ids,
            skip_special_tokens=True,
        )
        em, contained, spread, groups = rates(texts, golds, args.group)
        print(
            f"recall ({policy}): lenient EM {em:.1%}, gold contained {contained:.1%}, groups with spread {spread}/{groups}"
        )
        if policy != "latest":
            continue  # a perfect memory makes the policy irrelevant: measure it once
        for temperature in args.temperatures:
            perfect = [
                agent.templates.render_recall(
                    trajectories[p.trajectory_index].chunks[p.chunk_index - 1], p.masked_chunk
                )
                for p in probes
            ]
            n = args.group if temperature > 0 else 1
            sampling = SamplingConfig(
                max_new_tokens=args.answer_tokens, temperature=temperature, do_sample=temperature > 0, seed=args.seed
            )
            out = generator.generate([agent.encode_chat(m) for m in perfect], n=n, sampling=sampling)
            texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
            em, contained, spread, groups = rates(texts, [p.entity for p in probes for _ in range(n)], n)
            print(f"  perfect memory, temperature {temperature}: lenient EM {em:.1%}, gold contained {contained:.1%}")


if __name__ == "__main__":
    main()
