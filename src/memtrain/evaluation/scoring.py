"""Scoring and aggregation: pure functions of reply strings and gold answers (unit-tested on hand-written strings)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from memtrain.metrics import exact_match, extract_answer, f1_score, masked_entity_match, substring_match


TASKS = ("longqa", "memtrain", "search")
MODES = ("agent", "full_context")
ALL_BUCKETS = "all"

# The headline metric of each task: the one in the Markdown table and the plot.
PRIMARY_METRIC = {"longqa": "accuracy", "memtrain": "masked_entity_strict", "search": "em"}


def score_prediction(task: str, text: str, answers: Sequence[str], extraction: str = "lenient") -> dict[str, float]:
    """Scores of one raw reply against a row's accepted answers, by task.

    ``longqa`` extracts the answer (``extraction``: ``strict`` = last ``\\boxed{}``, ``lenient`` = box, answer tag,
    "answer:" line or first line) then applies SQuAD-normalised sub-EM (= accuracy), EM and F1. ``memtrain`` applies
    the paper's masked-entity rule with strict and lenient extraction.
    """
    answers = list(answers)
    if task == "memtrain":
        return {
            "masked_entity_strict": float(masked_entity_match(text, answers)),
            "masked_entity_lenient": float(masked_entity_match(text, answers, lenient=True)),
            "masked_entity_f1": f1_score(extract_answer(text, "lenient"), answers),
        }
    if task in ("longqa", "search"):
        prediction = extract_answer(text, extraction)
        return {
            "accuracy": substring_match(prediction, answers),
            "em": exact_match(prediction, answers),
            "f1": f1_score(prediction, answers),
        }
    raise ValueError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def aggregate_scores(
    row_scores: Sequence[Sequence[Mapping[str, float]] | None], buckets: Sequence[str]
) -> dict[str, Any]:
    """Per-bucket and average metrics from per-sample scores.

    ``row_scores[i]`` holds the scores of row ``i``'s samples (None: the row was skipped). A row's score is the mean
    over its samples; a bucket's is the mean over its evaluated rows; ``avg`` is the mean over buckets that have any
    evaluated row (the paper averages the bucket columns, so every length weighs the same). Each bucket also reports
    ``n`` (evaluated rows) and ``skipped``.
    """
    if len(row_scores) != len(buckets):
        raise ValueError(f"{len(row_scores)} rows of scores but {len(buckets)} bucket labels; pass one per row.")
    per_bucket: dict[str, list[dict[str, float]]] = {}
    skipped: dict[str, int] = {}
    for scores, bucket in zip(row_scores, buckets):
        per_bucket.setdefault(bucket, [])
        skipped.setdefault(bucket, 0)
        if scores is None:
            skipped[bucket] += 1
            continue
        if not scores:
            raise ValueError(f"A row of bucket {bucket!r} has no samples; each evaluated row needs >= 1 sample.")
        names = sorted({name for sample in scores for name in sample})
        per_bucket[bucket].append({name: _mean([s[name] for s in scores if name in s]) for name in names})

    result: dict[str, Any] = {"buckets": {}, "avg": {}}
    for bucket in sorted(per_bucket, key=_bucket_sort_key):
        rows = per_bucket[bucket]
        names = sorted({name for row in rows for name in row})
        metrics: dict[str, Any] = {name: _mean([row[name] for row in rows if name in row]) for name in names}
        metrics.update(n=len(rows), skipped=skipped[bucket])
        result["buckets"][bucket] = metrics
    evaluated = [m for m in result["buckets"].values() if m["n"] > 0]
    names = sorted({k for m in evaluated for k in m if k not in ("n", "skipped")})
    result["avg"] = {name: _mean([m[name] for m in evaluated if name in m]) for name in names}
    result["avg"].update(
        n=sum(m["n"] for m in result["buckets"].values()),
        skipped=sum(m["skipped"] for m in result["buckets"].values()),
    )
    return result


def _bucket_sort_key(bucket: str) -> tuple[int, float, str]:
    try:
        return (0, float(bucket), bucket)
    except ValueError:
        return (1, 0.0, bucket)


def _search_scores(metadata: Mapping[str, Any]) -> dict[str, float]:
    """EM as the search agent scored it (averaged over a row's questions) and F1 the same way."""
    predictions, golds = metadata["predictions"], metadata["gold_answers"]
    f1 = _mean([f1_score(p, list(g)) for p, g in zip(predictions, golds)])
    return {"em": float(metadata["em"]), "f1": f1}
