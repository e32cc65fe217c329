"""The row contract every task reads, checked: which columns a task needs and what makes a row unusable.

One validator for ``memtrain eval`` (memtrain.evaluation) and training (memtrain.preflight.check_training_rows). It
sits below both, with no imports of its own, so the checks never reach up into what they check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def check_rows(rows: Sequence[Mapping[str, Any]], task: str, source: str = "<rows>") -> None:
    """Fail early, naming the row and key, on rows the task cannot score."""
    if not rows:
        raise ValueError(f"--dataset {source} has no rows.")
    needed = ("prompt", "answers") if task == "search" else ("prompt", "context", "answers")
    for index, row in enumerate(rows):
        missing = [key for key in needed if key not in row]
        if missing:
            raise ValueError(
                f"--dataset {source} row {index}: missing {', '.join(missing)} (keys: {sorted(row)}). Rows need "
                f"{', '.join(needed)}; build long-text QA rows with memtrain.data.longqa or pass --longqa_num_docs."
            )
        answers = row["answers"]
        if task != "search" and (isinstance(answers, str) or not answers):
            raise ValueError(f"--dataset {source} row {index}: `answers` must be a non-empty list of strings.")
        if task == "search":
            continue
        if not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(
                f"--dataset {source} row {index}: `answers` must be a non-empty list of non-empty strings, got "
                f"{answers!r:.200}."
            )
        if not isinstance(row["context"], str) or not row["context"].strip():
            raise ValueError(
                f"--dataset {source} row {index}: `context` is empty; the memory agent has nothing to read."
            )
