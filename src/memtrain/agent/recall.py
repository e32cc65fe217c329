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

import copy
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from memtrain.agent.chunking import chunk_char_spans
from memtrain.agent.prompts import TARGET_TOKEN
from memtrain.agent.trajectory import Trajectory
from memtrain.data.document_entities import (
    ENTITIES_COLUMN,
    entities_in_ranges,
    read_entities,
    row_document_layout,
    tag_document,
)
from memtrain.data.documents import DEFAULT_DOCUMENT_TEMPLATE, template_spans
from memtrain.data.entities import find_leaks


logger = logging.getLogger(__name__)


EntityFinder = Callable[[list[str]], list[list[str]]]
"""Maps texts to the valid entities of each (the paper's spaCy rule); see memtrain.data.entities."""

EntityMasker = Callable[[str, str], str]
"""Masks every occurrence of an entity in a text with ``[TARGET]`` without leaking it."""


@dataclass
class RecallProbe:
    """One probe of one rollout: ``memory_step`` = k (memories[k] read chunks 1..k), ``chunk_index`` = l (1-based).

    ``memory`` is None while the rollout has not written memory k yet (a probe planned before or during the rollout).
    """

    trajectory_index: int
    memory_step: int
    chunk_index: int
    entity: str
    memory: str | None
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
    find_entities: EntityFinder | None,
    mask_entity: EntityMasker,
    policy: str = "any",
    seed: int = 0,
    *,
    template: str | None | Sequence[str | None] = DEFAULT_DOCUMENT_TEMPLATE,
    counts: Counter[str] | None = None,
    chunk_entities: Sequence[Sequence[Sequence[str]] | None] | None = None,
) -> list[RecallProbe | None]:
    """One probe per trajectory (None when none of its read chunks holds a usable entity).

    The draw depends on the chunks alone (a rollout reads all of its chunks), so probes can be planned before the
    memories exist: a probe's ``memory`` is the trajectory's memory k if already written, else None (see
    :class:`RecallProbeStream`).

    ``template`` is the document template of the contexts (the builder's default; None: no template guard), or one
    per trajectory (see :func:`row_document_template`); ``counts`` collects :func:`probe_candidates`' counts over
    the chunks tried. ``chunk_entities``: per trajectory, the entities of each of its chunks, found before (the
    document's tagged entities mapped onto its chunks, :class:`RecallEntities`), or None to run ``find_entities``
    over its chunk texts; the same guards apply either way.
    """
    templates = [template] * len(trajectories) if template is None or isinstance(template, str) else list(template)
    if len(templates) != len(trajectories):
        raise ValueError(f"{len(templates)} document templates for {len(trajectories)} trajectories.")
    known = list(chunk_entities) if chunk_entities is not None else [None] * len(trajectories)
    if len(known) != len(trajectories):
        raise ValueError(f"{len(known)} chunk entity lists for {len(trajectories)} trajectories.")
    rng = random.Random(seed)
    plans = [choose_probe_positions(t.num_chunks, policy, rng) for t in trajectories]
    # Rollouts of one document share their chunks: run NER once per distinct chunk text (none if all are known).
    texts = sorted(
        {trajectories[i].chunks[chunk - 1] for i, plan in enumerate(plans) if known[i] is None for _, chunk in plan}
    )
    if texts and find_entities is None:
        raise ValueError("Recall probes need find_entities for trajectories without chunk_entities.")
    entities = dict(zip(texts, find_entities(texts))) if texts else {}

    probes: list[RecallProbe | None] = []
    for i, (trajectory, plan) in enumerate(zip(trajectories, plans)):
        probe = None
        for k, chunk in plan:
            text = trajectory.chunks[chunk - 1]
            found = known[i][chunk - 1] if known[i] is not None else entities.get(text)
            candidates = probe_candidates(text, found or [], templates[i], counts)
            if candidates:
                entity = rng.choice(sorted(candidates))
                masked = mask_entity(text, entity)
                if TARGET_TOKEN in masked:
                    memory = trajectory.memories[k] if k < len(trajectory.memories) else None
                    probe = RecallProbe(i, k, chunk, entity, memory, masked)
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


ChunkEntities = list[list[str]]
"""The entity candidates of each chunk of one rollout (before :func:`probe_candidates`' guards)."""


class RecallEntities:
    """Entity candidates of each rollout's chunks for recall probes, with no NER on the training step's path.

    A row built by :class:`memtrain.data.documents.DocumentBuilder` carries its document's candidates with character
    offsets (the ``entities`` column); they are mapped onto the agent's token chunks (:func:`chunk_char_spans`: an
    entity is a chunk's when its span lies inside the chunk). A row without the column (another dataset, an older
    build) is tagged with the same :func:`~memtrain.data.document_entities.tag_document` in a background thread
    started with the rollout, so spaCy runs while the engine generates; that is logged once. Either way the
    candidates are a function of the documents alone, so they do not depend on the thread's timing.
    """

    def __init__(
        self,
        tokenizer: Any,
        chunk_size: int,
        max_chunks: int,
        find_entities: EntityFinder | None = None,
        *,
        background: bool = True,
    ) -> None:
        # the thread gets its own tokenizer: a fast tokenizer's Rust state must not be borrowed by two threads
        self.tokenizer = copy.deepcopy(tokenizer) if background else tokenizer
        self.chunk_size = chunk_size
        self.max_chunks = max_chunks
        self._find_entities = find_entities
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="recall-entities") if background else None
        )
        self._warned = False

    @property
    def find_entities(self) -> EntityFinder:
        if self._find_entities is None:
            self._find_entities = default_entity_tools()[0]
        return self._find_entities

    def start(self, rows: Sequence[Mapping[str, Any]]) -> PendingChunkEntities:
        """Begin finding the candidates of ``rows`` (one per rollout; copies of a document are done once)."""
        documents: dict[str, Mapping[str, Any]] = {}
        for row in rows:
            documents.setdefault(row.get("context") or "", row)
        missing = sum(1 for row in documents.values() if row.get(ENTITIES_COLUMN) is None)
        if missing and not self._warned:
            self._warned = True
            logger.warning(
                "Recall probes: %d of %d documents have no %r column (entity candidates with offsets); they are "
                "tagged with spaCy during generation, every step. Rebuild the dataset with `memtrain build-data` "
                "(scripts/build_dataset.py) to store them once.",
                missing,
                len(documents),
                ENTITIES_COLUMN,
            )
        keys = [row.get("context") or "" for row in rows]
        if self._executor is None:
            future: Future = Future()
            future.set_result(self._find(documents))
        else:
            future = self._executor.submit(self._find, documents)
        return PendingChunkEntities(future, keys)

    def _find(self, documents: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[list, list, float]]:
        """Per document: its chunks' character ranges, its candidates, and the seconds spent tagging it."""
        found = {}
        for context, row in documents.items():
            spans = chunk_char_spans(self.tokenizer, context, self.chunk_size, self.max_chunks)
            entities = read_entities(row)
            seconds = 0.0
            if entities is None:
                template, separator = row_document_layout(row)
                start = time.perf_counter()
                kept = [run for runs in spans for run in runs]
                entities = tag_document(
                    context, self.find_entities, template=template, separator=separator, within=kept
                )
                seconds = time.perf_counter() - start
            found[context] = (spans, entities, seconds)
        return found

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)


class PendingChunkEntities:
    """The candidates :meth:`RecallEntities.start` is finding; :meth:`result` waits for them."""

    def __init__(self, future: Future, keys: list[str]) -> None:
        self._future = future
        self._keys = keys

    @property
    def ner_seconds(self) -> float:
        """Seconds spaCy spent on rows without the column (0 when every row carries it); waits for the result."""
        return sum(seconds for _, _, seconds in self._future.result().values())

    def done(self) -> bool:
        """Whether the candidates are known (always, for rows that carry them)."""
        return self._future.done()

    def result(self, trajectories: Sequence[Trajectory]) -> list[ChunkEntities | None]:
        """Per rollout (the rows given to ``start``, in order), the candidates of each of its chunks; None for a
        rollout whose chunks are not the document's token chunks (then :func:`build_recall_probes` tags them)."""
        if len(trajectories) != len(self._keys):
            raise ValueError(f"{len(trajectories)} trajectories for {len(self._keys)} rows.")
        found = self._future.result()
        mapped: dict[tuple[str, tuple[str, ...]], ChunkEntities | None] = {}  # a document's G1 rollouts: once
        out: list[ChunkEntities | None] = []
        for key, trajectory in zip(self._keys, trajectories):
            spans, entities, _ = found[key]
            memo = (key, tuple(trajectory.chunks))
            if memo not in mapped:
                mapped[memo] = (
                    [entities_in_ranges(entities, runs, chunk) for runs, chunk in zip(spans, trajectory.chunks)]
                    if len(spans) == len(trajectory.chunks)
                    else None
                )
            chunk_entities = mapped[memo]
            out.append(None if chunk_entities is None else [list(entities) for entities in chunk_entities])
        return out
