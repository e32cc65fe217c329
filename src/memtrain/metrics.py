"""Answer extraction and answer metrics: SQuAD EM / sub-EM / F1 and the paper's masked-entity match.

Implemented here because ``evaluate.load("squad")`` needs the Hub. The same metrics ship as an ``evaluate`` module
that loads offline: ``evaluate.load(memtrain.metrics.EVALUATE_MODULE)`` (``resources/metrics/memtrain_qa``; it calls
these functions). The evaluation harness calls these functions directly, per reply, because it aggregates per
sample, per row and per length bucket (``evaluate``'s ``compute`` returns one mean per call and writes Arrow cache
files); tests/test_metrics.py checks that the module and the harness agree. Two families of comparison live side by side and
must not be mixed up:

- SQuAD-normalised metrics (:func:`exact_match`, :func:`substring_match`, :func:`f1_score`) for long-text QA and
  search QA, as in MemAgent's and MEM1's evaluations.
- The paper's masked-reconstruction rule (:func:`masked_entity_match`): the boxed answer must equal the masked entity
  up to case, whitespace and LaTeX escapes only.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal


__all__ = [
    "normalize_answer",
    "exact_match",
    "substring_match",
    "f1_score",
    "extract_boxed",
    "extract_answer",
    "masked_entity_match",
    "EVALUATE_MODULE",
    "RECALL_METRICS",
]

# How a recall answer may be scored (the recipe key `recall_metric`; memtrain.rewards.recall_score applies them):
# here, below both the recipe's settings and the rewards, so the settings can validate the name without the rewards.
RECALL_METRICS = ("exact", "f1")

# `evaluate.load(EVALUATE_MODULE)`: EM, sub-EM, F1 and masked-entity match as a Hugging Face `evaluate` module.
EVALUATE_MODULE = str(Path(__file__).resolve().parent / "resources" / "metrics" / "memtrain_qa")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# `\boxed{`, `\boxed {` and `\fbox{`: the commands models use for a final answer.
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_PHRASE = re.compile(r"answer\s*(?::|is\b)", re.IGNORECASE)
# A whole answer wrapped in one text-style LaTeX command, e.g. `\text{Paris}` (lenient mode only).
_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|textit|mathrm|mathbf|emph)\s*\{(.*)\}$", re.DOTALL)
_DECORATION = "*_`\"' \t\n"

ExtractionMode = Literal["strict", "lenient"]


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_golds(golds: str | Sequence[str]) -> list[str]:
    """Accept one gold string or a list of accepted strings; an empty list is a data bug, not a zero score."""
    if isinstance(golds, str):
        return [golds]
    golds = list(golds)
    if not golds:
        raise ValueError("No gold answers were given: every row needs at least one accepted answer in `answers`.")
    for gold in golds:
        if not isinstance(gold, str):
            raise TypeError(f"Gold answers must be strings, got {type(gold).__name__}: {gold!r}.")
    return golds


def exact_match(prediction: str | None, golds: str | Sequence[str]) -> float:
    """1.0 if the SQuAD-normalised prediction equals any normalised gold, else 0.0 (None predicts nothing)."""
    golds = _as_golds(golds)
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gold) for gold in golds))


def substring_match(prediction: str | None, golds: str | Sequence[str]) -> float:
    """MemAgent's "sub-EM": 1.0 if a normalised gold occurs inside the normalised prediction.

    Plain substring containment as in MemAgent's evaluation (so "cat" is found in "cats"). One deliberate difference:
    a gold that normalises to the empty string (e.g. "The") never matches, since it would be "contained" in anything.
    """
    golds = _as_golds(golds)
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any((gold_n := normalize_answer(gold)) and gold_n in pred for gold in golds))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # SQuAD v2's convention: two empty answers agree, one empty answer scores 0.
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str | None, golds: str | Sequence[str]) -> float:
    """SQuAD token F1 (bag of normalised tokens), the maximum over the golds (None predicts nothing)."""
    golds = _as_golds(golds)
    if prediction is None:
        return 0.0
    pred_tokens = normalize_answer(prediction).split()
    return max(_token_f1(pred_tokens, normalize_answer(gold).split()) for gold in golds)


def _balanced_content(text: str, open_brace: int) -> str | None:
    """The text between ``text[open_brace] == "{"`` and its matching brace; escaped braces (``\\{``) do not count."""
    depth = 0
    i = open_brace
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, e.g. `\{` or `\}`
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (also ``\\boxed {...}`` and ``\\fbox{...}``), nested braces included.

    The final answer is the last box: models often restate or correct themselves. If that last box is never closed
    (a generation cut off by the token limit) the answer is None rather than an earlier box, so a truncated reply is
    never rewarded. The content is returned stripped of surrounding whitespace.
    """
    starts = list(_BOX_START.finditer(text))
    if not starts:
        return None
    last = starts[-1]
    content = _balanced_content(text, last.end() - 1)
    return None if content is None else content.strip()


def _clean_lenient(answer: str) -> str:
    """Strip markdown/quote decoration, a whole-answer ``\\text{...}`` wrapper and a sentence-final period."""
    answer = answer.strip(_DECORATION)
    wrapped = _TEXT_WRAPPER.match(answer)
    if wrapped:
        answer = wrapped.group(1).strip(_DECORATION)
    # "Paris." -> "Paris", but keep abbreviations such as "U.S." or "Washington, D.C." intact.
    if answer.endswith(".") and "." not in answer[:-1]:
        answer = answer[:-1].rstrip(_DECORATION)
    return answer


def extract_answer(text: str, mode: ExtractionMode = "strict") -> str | None:
    """The final answer of a reply, or None when there is none.

    ``strict`` (the paper's rule): the content of the last ``\\boxed{}`` (see :func:`extract_boxed`), else None.

    ``lenient`` (for small models that rarely box), the first rule that applies:

    1. the last complete ``\\boxed{}`` / ``\\fbox{}``;
    2. else the content of the last ``<answer>...</answer>``;
    3. else the rest of the line after the last "answer:" or "answer is" (case-insensitive), if not empty;
    4. else the first non-empty line of the text.

    A lenient answer is then cleaned: surrounding ``*``, ``_``, backticks and quotes are stripped, a whole-answer
    ``\\text{...}`` (or ``\\textbf``, ``\\mathrm``, ...) wrapper is removed, and a final period is dropped when it is
    the only period ("Paris." -> "Paris", "U.S." stays). An empty result is None.
    """
    if mode not in ("strict", "lenient"):
        raise ValueError(f"Unknown answer extraction mode {mode!r}: use 'strict' or 'lenient'.")
    boxed = extract_boxed(text)
    if mode == "strict":
        return boxed
    if boxed is not None:
        candidate = boxed
    elif tags := _ANSWER_TAG.findall(text):
        candidate = tags[-1]
    else:
        candidate = ""
        phrases = list(_ANSWER_PHRASE.finditer(text))
        if phrases:
            candidate = text[phrases[-1].end() :].strip().split("\n", 1)[0]
        if not candidate.strip(_DECORATION):
            candidate = next((line for line in text.splitlines() if line.strip(_DECORATION)), "")
    answer = _clean_lenient(candidate)
    return answer or None


_LATEX_ESCAPE = re.compile(r"\\([^A-Za-z0-9\s])")


def _case_space_fold(s: str) -> str:
    """The paper's answer comparison: LaTeX escapes (``\\%``, ``\\$``, ``\\&``...) unescaped, all whitespace removed,
    lower case."""
    return "".join(_LATEX_ESCAPE.sub(r"\1", s).split()).lower()


def masked_entity_match(prediction_text: str, gold: str | Sequence[str], lenient: bool = False) -> bool:
    """The paper's reward for masked reconstruction and memory recall: boxed answer == entity, up to case/whitespace.

    Unlike SQuAD EM, punctuation and articles are NOT dropped: the target is one exact span of the document (an
    entity such as "The Beatles" or "U.S."), so "Beatles" is a wrong reconstruction. As in the reference code, only
    letter case and whitespace (removed entirely: "New York" == "NewYork") are ignored, and LaTeX escapes a model
    writes inside ``\\boxed{}`` are undone ("50\\%" == "50%", "\\$5" == "$5"). ``lenient`` extracts the answer
    with :func:`extract_answer`'s lenient rule instead of requiring a box; the comparison itself is the same. ``gold`` may list several accepted spellings.
    """
    answer = extract_answer(prediction_text, "lenient" if lenient else "strict")
    if answer is None:
        return False
    folded = _case_space_fold(answer)
    return any(folded == _case_space_fold(g) for g in _as_golds(gold))
