"""Intermediate memory recall probes (PAPER.md section 4).

After a rollout, pick a memory ``m_k`` that has read at least one chunk and a chunk ``c_l`` it HAS read (``l <= k``),
mask one entity of ``c_l`` with ``[TARGET]``, and ask the model to name it from ``m_k`` alone. Unlike the reference
code, the first chunk is eligible and a chunk the memory has not read yet never is.

The paper picks the memory first and then a chunk it has read: k uniform over the memories, then l uniform over
1..k (a uniform draw over (k, l) pairs would pick the last memory k/(1+...+K) of the time, 22% for 8 chunks).

Two kinds of candidate entity are never a probe's answer. Chunks are cut at token boundaries, so a chunk may begin
or end inside a word ("...designed by Manuel Fontan"): an entity at the very start or end of a chunk may be such a
fragment. And chunks are cut from the RENDERED document, whose "Document 12:" headers spaCy tags as numbers: an
entity read in template text (:func:`memtrain.data.documents.template_spans`, the builder's header guard) would
turn a header into "Document [TARGET]:", answerable from the neighbouring headers without any memory.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from memtrain.agent.prompts import TARGET_TOKEN
from memtrain.agent.trajectory import Trajectory
from memtrain.data.documents import DEFAULT_DOCUMENT_TEMPLATE, template_spans
from memtrain.data.entities import find_leaks


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
    """All eligible (k, l) pairs in the order to try them, drawn without replacement as the paper draws one probe.

    ``any``: k uniform in 1..K, then l uniform in 1..k, so pair (k, l) has probability 1/(K k); the fallbacks follow
    in the same law (exponential race: pair (k, l) waits Exp(1) * k, shortest first). ``latest``: l = k, k uniform.
    """
    if num_chunks < 1:
        return []
    if policy == "latest":
        pairs = [(k, k) for k in range(1, num_chunks + 1)]
        rng.shuffle(pairs)
        return pairs
    if policy != "any":
        raise ValueError(f"Unknown recall chunk policy {policy!r}; use `any` or `latest`.")
    keyed = [(rng.expovariate(1.0) * k, k, chunk) for k in range(1, num_chunks + 1) for chunk in range(1, k + 1)]
    return [(k, chunk) for _, k, chunk in sorted(keyed)]


def touches_chunk_edge(chunk: str, entity: str) -> bool:
    """True when ``entity`` opens or closes ``chunk`` (whitespace aside): it may be a word cut by chunking."""
    text = chunk.strip()
    return text.startswith(entity) or text.endswith(entity)


def in_template_text(
    chunk: str,
    entity: str,
    template: str = DEFAULT_DOCUMENT_TEMPLATE,
    headers: Sequence[tuple[int, int]] | None = None,
) -> bool:
    """True when ``entity`` can be read (any leak form of :func:`~memtrain.data.entities.find_leaks`) in a span that
    overlaps the document template text of ``chunk``. ``headers``: that chunk's :func:`template_spans`, if known.

    Only a window around each header is searched, so a 5,000-token chunk with hundreds of entities stays cheap.
    """
    headers = template_spans(chunk, template) if headers is None else headers
    margin = 2 * len(entity) + 16  # a leak form overlapping the header lies within this many characters of it
    for h_start, h_end in headers:
        lo, hi = max(0, h_start - margin), min(len(chunk), h_end + margin)
        for start, end in find_leaks(chunk[lo:hi], entity):
            if lo + start < h_end and h_start < lo + end:
                return True
    return False


def probe_candidates(
    chunk: str,
    entities: Sequence[str],
    template: str | None = DEFAULT_DOCUMENT_TEMPLATE,
    counts: Counter[str] | None = None,
) -> list[str]:
    """The entities of ``chunk`` that may be a probe's answer: not cut by a chunk edge, not in template text.

    ``counts`` (if given) gets ``candidates`` (entities looked at), ``chunk_edge`` and ``template_text`` (rejected).
    ``template=None`` turns the template guard off (a corpus whose chunks carry no document template).
    """
    kept = []
    headers = template_spans(chunk, template) if template is not None else []
    for entity in entities:
        reason = None
        if touches_chunk_edge(chunk, entity):
            reason = "chunk_edge"
        elif headers and in_template_text(chunk, entity, template, headers):
            reason = "template_text"
        if counts is not None:
            counts["candidates"] += 1
            if reason:
                counts[reason] += 1
        if reason is None:
            kept.append(entity)
    return kept


def build_recall_probes(
    trajectories: list[Trajectory],
    find_entities: EntityFinder,
    mask_entity: EntityMasker,
    policy: str = "any",
    seed: int = 0,
    *,
    template: str | None | Sequence[str | None] = DEFAULT_DOCUMENT_TEMPLATE,
    counts: Counter[str] | None = None,
) -> list[RecallProbe | None]:
    """One probe per trajectory (None when none of its read chunks holds a usable entity).

    ``template`` is the document template of the contexts (the builder's default; None: no template guard), or one
    per trajectory (see :func:`row_document_template`); ``counts`` collects :func:`probe_candidates`' counts over
    the chunks tried.
    """
    templates = [template] * len(trajectories) if template is None or isinstance(template, str) else list(template)
    if len(templates) != len(trajectories):
        raise ValueError(f"{len(templates)} document templates for {len(trajectories)} trajectories.")
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
            candidates = probe_candidates(text, entities.get(text) or [], templates[i], counts)
            if candidates:
                entity = rng.choice(sorted(candidates))
                masked = mask_entity(text, entity)
                if TARGET_TOKEN in masked:
                    probe = RecallProbe(i, k, chunk, entity, trajectory.memories[k], masked)
                    break
        probes.append(probe)
    return probes


def row_document_template(row: Mapping[str, Any]) -> str:
    """The document template a dataset row was built with (its ``builder_config``), else the builder's default.

    Datasets built with a custom ``document_template`` carry it in every row, so the probes' template guard reads
    the headers those documents really have.
    """
    config = row.get("builder_config")
    if isinstance(config, str) and config:
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            return DEFAULT_DOCUMENT_TEMPLATE
    if isinstance(config, Mapping) and isinstance(config.get("document_template"), str):
        return config["document_template"]
    return DEFAULT_DOCUMENT_TEMPLATE


def default_entity_tools() -> tuple[EntityFinder, EntityMasker]:
    """The paper's spaCy entity rule and the leak-free masker of memtrain.data.entities, for recall probes."""
    from memtrain.data.entities import EntityExtractor, EntityLeakError, mask_entity_in_text

    extractor = EntityExtractor()

    def find_entities(texts: list[str]) -> list[list[str]]:
        return [[entity.text for entity in entities] for entities in extractor(texts)]

    def mask_target(text: str, entity: str) -> str:
        try:
            return mask_entity_in_text(text, entity, token=TARGET_TOKEN)
        except EntityLeakError:
            return text  # unmaskable without a leak: build_recall_probes moves on to another entity or chunk

    return find_entities, mask_target
