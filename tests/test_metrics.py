"""Answer metrics against hand-computed values (the arithmetic is in the comments)."""

from __future__ import annotations

import pytest

from memtrain.metrics import (
    exact_match,
    extract_answer,
    extract_boxed,
    f1_score,
    masked_entity_match,
    normalize_answer,
    substring_match,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The  Quick, brown FOX!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("Theater", "theater"),  # articles only as whole words
        ("Don't stop", "dont stop"),  # punctuation is dropped, not replaced by a space
        ("  \tU.S.A.\n", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer_is_squads(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_takes_the_best_gold():
    assert exact_match("The Beatles", ["beatles"]) == 1.0
    assert exact_match("Beatles.", ["Rolling Stones", "the beatles"]) == 1.0
    assert exact_match("The Beatles band", ["Beatles"]) == 0.0
    assert exact_match(None, ["Beatles"]) == 0.0
    assert exact_match("Paris", "paris") == 1.0  # a single gold string is accepted


def test_substring_match_is_memagents_sub_em():
    # "it is paris france" contains "paris france"
    assert substring_match("It is Paris, France.", ["Paris France"]) == 1.0
    assert substring_match("Paris", ["Paris, France"]) == 0.0
    # plain containment, as in MemAgent: "cat" is inside "cats"
    assert substring_match("two cats", ["cat"]) == 1.0
    # a gold that normalises to "" would be inside everything: it never matches
    assert substring_match("anything", ["The"]) == 0.0
    assert substring_match(None, ["cat"]) == 0.0


def test_f1_hand_computed():
    # "the cat sat" -> [cat, sat]; "a cat sat on" -> [cat, sat, on]; common 2: P = 2/2, R = 2/3, F1 = 2PR/(P+R) = 0.8
    assert f1_score("the cat sat", ["a cat sat on"]) == pytest.approx(0.8)
    # [barack, obama, was, president] vs [obama]: P = 1/4, R = 1, F1 = 0.5/1.25 = 0.4
    assert f1_score("Barack Obama was president", "Obama") == pytest.approx(0.4)
    # bag of tokens: [cat, cat, cat] vs [cat, cat, dog]: common min(3, 2) = 2, P = R = 2/3, F1 = 2/3
    assert f1_score("the cat cat cat", ["cat cat dog"]) == pytest.approx(2 / 3)
    # max over golds: 0 for "London"; [paris] vs [paris, france]: P = 1, R = 1/2, F1 = 2/3
    assert f1_score("Paris", ["London", "Paris, France"]) == pytest.approx(2 / 3)
    assert f1_score("Rome", ["London"]) == 0.0
    # SQuAD v2 convention for empty answers: both empty agree, one empty scores 0
    assert f1_score("the", ["a"]) == 1.0
    assert f1_score("the", ["Paris"]) == 0.0
    assert f1_score(None, ["Paris"]) == 0.0


def test_bad_golds_are_clear_errors():
    with pytest.raises(ValueError, match="at least one accepted answer"):
        exact_match("x", [])
    with pytest.raises(TypeError, match="must be strings"):
        f1_score("x", [3])


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        (r"The answer is \boxed{Paris}.", "Paris"),
        (r"\boxed{\frac{1}{2}} and so", r"\frac{1}{2}"),  # nested braces
        (r"first \boxed{A}, then corrected: \boxed{B}", "B"),  # the last box wins
        (r"\boxed {  spaced  }", "spaced"),
        (r"\fbox{framed}", "framed"),
        (r"set \boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\boxed{}", ""),
        ("no box here", None),
        (r"\boxed{A} then a cut-off \boxed{B", None),  # last box never closed: no answer, not A
        (r"\boxed", None),
    ],
)
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


def test_extract_answer_strict_is_boxed_only():
    assert extract_answer(r"so \boxed{Marie Curie}") == "Marie Curie"
    assert extract_answer("<answer>Marie Curie</answer>") is None
    assert extract_answer("Marie Curie", mode="strict") is None
    with pytest.raises(ValueError, match="'strict' or 'lenient'"):
        extract_answer("x", mode="loose")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (r"<answer>X</answer> but \boxed{Marie Curie}", "Marie Curie"),  # 1. a box beats everything
        (r"\boxed{\text{Marie Curie}}", "Marie Curie"),  # whole-answer \text{} unwrapped
        ("<answer>A</answer> then <answer> Marie Curie </answer>", "Marie Curie"),  # 2. last answer tag
        ("Some reasoning.\nThe answer is **Marie Curie**.\nDone", "Marie Curie"),  # 3. after "answer is"
        ("Final Answer:\n  Marie Curie", "Marie Curie"),  # the answer may start on the next line
        ("\n\n  Marie Curie.\nbecause she discovered polonium", "Marie Curie"),  # 4. first non-empty line
        ("The answer is U.S.", "U.S."),  # abbreviations keep their final period
        ('"Paris"', "Paris"),
        ("   \n  ", None),
        ("", None),
    ],
)
def test_extract_answer_lenient(text, answer):
    assert extract_answer(text, mode="lenient") == answer


def test_masked_entity_match_removes_whitespace_and_latex_escapes_as_the_paper():
    assert masked_entity_match(r"\boxed{NewYork}", "New York")
    assert masked_entity_match(r"\boxed{50\%}", "50%")
    assert masked_entity_match(r"\boxed{\$5 million}", "$5 million")
    assert masked_entity_match(r"\boxed{AT\&T}", "AT&T")
    assert masked_entity_match(r"\boxed{50%}", r"50\%")  # escapes are undone on both sides
    assert not masked_entity_match(r"\boxed{50}", "50%")
    assert not masked_entity_match(r"\boxed{New-York}", "New York")  # punctuation still counts


def test_masked_entity_match_is_case_and_space_insensitive_only():
    assert masked_entity_match(r"\boxed{marie   CURIE}", "Marie Curie")
    assert masked_entity_match("\\boxed{ Marie\n\tCurie }", "Marie Curie")
    # no SQuAD normalisation: articles and punctuation are part of the entity
    assert not masked_entity_match(r"\boxed{Beatles}", "The Beatles")
    assert not masked_entity_match(r"\boxed{US}", "U.S.")
    assert masked_entity_match(r"\boxed{U.S.}", "U.S.")
    # strict needs a box; lenient falls back to the plain reply
    assert not masked_entity_match("Marie Curie", "Marie Curie")
    assert masked_entity_match("Marie Curie.", "Marie Curie", lenient=True)
    # several accepted spellings
    assert masked_entity_match(r"\boxed{NYC}", ["New York City", "NYC"])


def test_the_evaluate_module_loads_offline_and_agrees_with_the_harness(tmp_path, monkeypatch):
    """`evaluate.load(EVALUATE_MODULE)` with no Hub: the harness's per-reply scores, averaged, are its results."""
    import evaluate

    from memtrain.evaluation import score_prediction
    from memtrain.metrics import EVALUATE_MODULE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    metric = evaluate.load(EVALUATE_MODULE)
    predictions = [
        "\\boxed{The Eiffel Tower.}",
        "\\boxed{near the Eiffel Tower Paris}",
        "Answer: Lyon",
        "\\boxed{Bonn}",
    ]
    references = [["Eiffel Tower"], ["Eiffel Tower", "Tour Eiffel"], ["Lyon"], ["Bonn"]]
    result = metric.compute(predictions=predictions, references=references)
    longqa = [score_prediction("longqa", p, r) for p, r in zip(predictions, references)]
    memtrain = [score_prediction("memtrain", p, r) for p, r in zip(predictions, references)]
    mean = lambda rows, key: sum(row[key] for row in rows) / len(rows)  # noqa: E731
    assert result["em"] == pytest.approx(mean(longqa, "em")) == pytest.approx(3 / 4)
    assert result["sub_em"] == pytest.approx(mean(longqa, "accuracy")) == pytest.approx(1.0)
    # F1: 1, 2/3 (near-the-eiffel-tower-paris vs eiffel tower), 1, 1
    assert result["f1"] == pytest.approx(mean(longqa, "f1")) == pytest.approx((3 + 2 / 3) / 4)
    # masked-entity: only the exact boxed entities (`The Eiffel Tower.` keeps its article and full stop)
    assert result["masked_entity"] == pytest.approx(mean(memtrain, "masked_entity_strict")) == pytest.approx(1 / 4)
    assert result["masked_entity_lenient"] == pytest.approx(mean(memtrain, "masked_entity_lenient")) == 0.5
    strict = metric.compute(predictions=predictions, references=references, extraction="strict")
    assert strict["em"] == pytest.approx(2 / 4)  # "Answer: Lyon" has no box
