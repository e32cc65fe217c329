"""Evaluation rows: loading, validation, per-bucket selection and long-text QA buckets built on the fly."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memtrain.evaluation.scoring import ALL_BUCKETS


def load_rows(source: str | Path) -> list[dict[str, Any]]:
    """Rows from a ``.json``/``.jsonl``/``.parquet`` file, a ``save_to_disk`` folder (Dataset or DatasetDict: the
    splits other than ``train`` are concatenated, or ``train`` when it is the only one), or a folder written by
    ``scripts/build_dataset.py`` / ``scripts/build_longqa.py`` (its ``dataset/`` subfolder)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--dataset {source}: no such file or folder; give rows as .jsonl/.json/.parquet "
                                "or a dataset folder written by save_to_disk / scripts/build_dataset.py.")  # fmt: skip
    if path.is_dir():
        import datasets

        folder = path / "dataset" if (path / "dataset").is_dir() else path
        try:
            loaded = datasets.load_from_disk(str(folder))
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--dataset {source}: not a save_to_disk folder ({error}).") from None
        if isinstance(loaded, datasets.DatasetDict):
            # A build with held-out splits (long-text QA: train + test_n<N>) is evaluated on the held-out ones only.
            held_out = [name for name in loaded if name != "train"]
            parts = [loaded[name] for name in (held_out or list(loaded))]
        else:
            parts = [loaded]
        return [dict(row) for part in parts for row in part]
    if path.suffix == ".parquet":
        import datasets

        return [dict(row) for row in datasets.Dataset.from_parquet(str(path))]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"--dataset {source} line {number}: invalid JSON ({error}).") from None
        return rows
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"--dataset {source}: expected a JSON list of rows (or {{'data': [...]}}).")
        return data
    raise ValueError(f"--dataset {source}: unknown file type {path.suffix!r}; use .jsonl, .json or .parquet.")


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


def row_bucket(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    return ALL_BUCKETS if value is None else str(value)


def select_rows(rows: Sequence[dict[str, Any]], column: str, limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` rows of each bucket (all when None), in the dataset's order."""
    if limit is None:
        return list(rows)
    seen: dict[str, int] = {}
    kept = []
    for row in rows:
        bucket = row_bucket(row, column)
        if seen.get(bucket, 0) < limit:
            seen[bucket] = seen.get(bucket, 0) + 1
            kept.append(row)
    return kept


def build_longqa_rows(source: str | Path, num_docs: Sequence[int], num_questions: int | None, seed: int) -> list[dict]:
    """Long-text QA buckets built on the fly from raw HotpotQA/MuSiQue rows (memtrain.data.longqa)."""
    from memtrain.data.longqa import build_test_buckets, load_examples

    examples = load_examples(str(source))
    buckets = build_test_buckets(examples, tuple(num_docs), num_questions=num_questions, seed=seed)
    return [row for rows in buckets.values() for row in rows]
