"""Intermediate memory recall probes (PAPER.md section 4).

After a rollout, pick a memory ``m_k`` that has read at least one chunk and a chunk ``c_l`` it HAS read (``l <= k``),
mask one entity of ``c_l`` with ``[TARGET]``, and ask the model to name it from ``m_k`` alone. Unlike the reference
code, the first chunk is eligible and a chunk the memory has not read yet never is.

Chunks are cut at token boundaries, so a chunk may begin or end inside a word ("...designed by Manuel Fontan").
An entity at the very start or end of a chunk may be such a fragment, so it is never a probe's answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from memtrain.agent.prompts import TARGET_TOKEN
from memtrain.agent.trajectory import Trajectory


EntityFinder = Callable[[list[str]], list[list[str]]]
"""Maps texts to the valid entities of each (the paper's spaCy rule); see memtrain.data.entities."""

EntityMasker = Callable[[str, str], str]
"""Masks every occurrence of an entity in a text with ``[TARGET]`` without leaking it."""


@dataclass
class RecallProbe:
    """One probe of one rollout: ``memory_step`` = k (memories[k] read chunks 1..k), ``chunk_index`` = l (1-based)."""

    trajectory_index: int
    memory_step: int
    chunk_index: int
    entity: str
    memory: str
    masked_chunk: str


def choose_probe_positions(num_chunks: int, policy: str, rng: random.Random) -> list[tuple[int, int]]:
    """All eligible (k, l) pairs in the order to try them: a random one first, the rest shuffled as fallbacks."""
    if num_chunks < 1:
        return []
    pairs = [(k, k) for k in range(1, num_chunks + 1)]
    if policy == "any":
        pairs = [(k, chunk) for k in range(1, num_chunks + 1) for chunk in range(1, k + 1)]
    elif policy != "latest":
        raise ValueError(f"Unknown recall chunk policy {policy!r}; use `any` or `latest`.")
    rng.shuffle(pairs)
    return pairs


def touches_chunk_edge(chunk: str, entity: str) -> bool:
    """True when ``entity`` opens or closes ``chunk`` (whitespace aside): it may be a word cut by chunking."""
    text = chunk.strip()
    return text.startswith(entity) or text.endswith(entity)


def build_recall_probes(
    trajectories: list[Trajectory],
    find_entities: EntityFinder,
    mask_entity: EntityMasker,
    policy: str = "any",
    seed: int = 0,
) -> list[RecallProbe | None]:
    """One probe per trajectory (None when none of its read chunks holds a valid entity)."""
    rng = random.Random(seed)
    plans = [choose_probe_positions(len(t.memories) - 1, policy, rng) for t in trajectories]
    # Rollouts of one document share their chunks: run NER once per distinct chunk text.
    texts = sorted({trajectories[i].chunks[chunk - 1] for i, plan in enumerate(plans) for _, chunk in plan})
    entities = dict(zip(texts, find_entities(texts))) if texts else {}

    probes: list[RecallProbe | None] = []
    for i, (trajectory, plan) in enumerate(zip(trajectories, plans)):
        probe = None
        for k, chunk in plan:
            text = trajectory.chunks[chunk - 1]
            candidates = [e for e in entities.get(text) or [] if not touches_chunk_edge(text, e)]
            if candidates:
                entity = rng.choice(sorted(candidates))
                masked = mask_entity(text, entity)
                if TARGET_TOKEN in masked:
                    probe = RecallProbe(i, k, chunk, entity, trajectory.memories[k], masked)
                    break
        probes.append(probe)
    return probes
