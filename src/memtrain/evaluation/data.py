"""Evaluation rows: loading, per-bucket selection and long-text QA buckets built on the fly (checks: memtrain.data.rows)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memtrain.data.rows import check_rows
from memtrain.evaluation.scoring import ALL_BUCKETS


_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# File types read with `datasets.load_dataset(<builder>, data_files=...)`; .json/.jsonl are read here (exact errors).
_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow", ".txt": "text"}


def _pick_splits(loaded: Any, source: str, split: str | None) -> list[Any]:
    """One split when asked; else the held-out splits (all but ``train``), or ``train`` when it is the only one."""
    import datasets

    if not isinstance(loaded, (datasets.DatasetDict, dict)):
        return [loaded]
    if split is not None:
        if split not in loaded:
            raise ValueError(
                f"--dataset {source} has no split {split!r}; pass --dataset_split one of {sorted(loaded)}."
            )
        return [loaded[split]]
    # A build with held-out splits (long-text QA: train + test_n<N>) is evaluated on the held-out ones only.
    held_out = [name for name in loaded if name != "train"]
    return [loaded[name] for name in (held_out or list(loaded))]


def _json_rows(path: Path, source: str) -> list[dict[str, Any]]:
    from memtrain.preflight import read_utf8_text

    text = read_utf8_text(path, "--dataset")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"--dataset {source} line {number}: invalid JSON ({error}).") from None
        return rows
    data = json.loads(text)
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"--dataset {source}: expected a JSON list of rows (or {{'data': [...]}}).")
    return data


def load_rows(source: str | Path, config_name: str | None = None, split: str | None = None) -> list[dict[str, Any]]:
    """Rows from any source training reads, and any that ``datasets.load_dataset`` reads.

    - a ``.jsonl`` / ``.json`` file (a list of rows or ``{"data": [...]}``), read here so a bad line is named;
    - another data file (``.parquet``, ``.csv``, ``.tsv``, ``.arrow``) through ``load_dataset(<format>)``;
    - a ``save_to_disk`` folder, or a folder written by ``scripts/build_*.py`` (its ``dataset/`` subfolder);
    - any other local folder through ``load_dataset(folder)`` (data files laid out as on the Hub);
    - otherwise a Hub dataset id, with ``config_name`` and ``split``.

    Without ``split``, a dataset with several splits is evaluated on every split but ``train`` (its held-out
    buckets), or on ``train`` when it is the only one.
    """
    import datasets

    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix in (".jsonl", ".json"):
            return _json_rows(path, text)
        if path.suffix not in _BUILDERS:
            raise ValueError(f"--dataset {text}: unknown file type {path.suffix!r}; use .jsonl, .json, "
                             f"{', '.join(_BUILDERS)} or a dataset folder.")  # fmt: skip
        loaded = datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split=split or "train")
        return [dict(row) for row in loaded]
    if path.is_dir():
        folder = path / "dataset" if (path / "dataset").is_dir() else path
        if any((folder / marker).is_file() for marker in _SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(folder))
        else:
            try:
                loaded = datasets.load_dataset(str(path), config_name)
            except (FileNotFoundError, ValueError) as error:
                raise ValueError(f"--dataset {text}: no rows `datasets.load_dataset` can read ({error}).") from None
        return [dict(row) for part in _pick_splits(loaded, text, split) for row in part]
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or Path(text).suffix in (".jsonl", ".json", *_BUILDERS):
        raise FileNotFoundError(f"--dataset {text}: no such file or folder; give rows as .jsonl/.json/.parquet, a "
                                "dataset folder (save_to_disk, scripts/build_*.py) or a Hub dataset id.")  # fmt: skip
    try:
        loaded = datasets.load_dataset(text, config_name, split=split)
    except Exception as error:  # offline, unknown id, gated, unknown config: one line with the Hub's reason
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"--dataset {text}: not a local file or folder, and loading it as a Hub dataset failed ({reason}). "
            "Check the id, --dataset_config and --dataset_split, or HF_HUB_OFFLINE."
        ) from None
    return [dict(row) for part in _pick_splits(loaded, text, split) for row in part]


def map_columns(
    rows: Sequence[Mapping[str, Any]],
    source: str,
    prompt: str = "prompt",
    context: str = "context",
    answers: str = "answers",
) -> list[dict[str, Any]]:
    """Rows with the dataset's columns renamed to the contract's ``prompt`` / ``context`` / ``answers``."""
    mapping = {"prompt": prompt, "context": context, "answers": answers}
    if all(key == column for key, column in mapping.items()):
        return [dict(row) for row in rows]
    columns = sorted({key for row in rows[:1] for key in row})
    for key, column in mapping.items():
        if key != column and rows and column not in rows[0]:
            raise ValueError(f"--dataset {source} has no column {column!r} (--{key}_column); its columns: {columns}.")
    mapped = []
    for row in rows:
        row = dict(row)
        for key, column in mapping.items():
            if key != column and column in row:
                row[key] = row.pop(column)
        mapped.append(row)
    return mapped


def is_multi_question(row: Mapping[str, Any]) -> bool:
    """A long document with several questions: ``prompt`` a list of questions, ``answers`` one list per question."""
    return isinstance(row.get("prompt"), (list, tuple))


def expand_questions(rows: Sequence[Mapping[str, Any]], task: str, source: str = "<rows>") -> list[dict[str, Any]]:
    """One row per question of multi-question rows (single-question rows unchanged).

    Each question row keeps its document's other columns (context, bucket) and gets ``id`` = ``<row id>/q<k>``,
    ``read_group`` = the row id (the rows that share one read under ``--multi_question read_once``) and
    ``question_index``. The search task keeps its rows whole: MEM1's agent answers a row's questions together, so a
    list of questions becomes its newline-separated prompt.
    """
    expanded: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        if not is_multi_question(row):
            expanded.append(dict(row))
            continue
        questions, answers = list(row["prompt"]), row.get("answers")
        where = f"--dataset {source} row {index}"
        if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
            raise ValueError(f"{where}: `prompt` is a list of questions but some are empty or not strings.")
        if (
            isinstance(answers, (list, tuple))
            and len(answers) == len(questions)
            and all(isinstance(a, str) for a in answers)
        ):
            answers = [[a] for a in answers]  # one answer string per question (L-Eval's `outputs`)
        if (
            not isinstance(answers, (list, tuple))
            or len(answers) != len(questions)
            or not all(isinstance(a, (list, tuple)) for a in answers)
        ):
            raise ValueError(
                f"{where}: {len(questions)} questions need `answers` as one list of accepted answers per question "
                f"(a list of {len(questions)} lists) or one answer string per question, got {answers!r:.200}."
            )
        if task == "search":
            expanded.append({**row, "prompt": "\n".join(questions), "answers": [list(a) for a in answers]})
            continue
        row_id = str(row.get("id", index))
        for k, (question, golds) in enumerate(zip(questions, answers)):
            expanded.append(
                {
                    **row,
                    "id": f"{row_id}/q{k}",
                    "prompt": question,
                    "answers": list(golds),
                    "read_group": row_id,
                    "question_index": k,
                }  # fmt: skip
            )
    return expanded


def row_bucket(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    return ALL_BUCKETS if value is None else str(value)


def select_rows(rows: Sequence[dict[str, Any]], column: str, limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` documents of each bucket (all when None), in the dataset's order.

    The questions of one multi-question document (one ``read_group``) count once and stay together, so selecting
    before or after :func:`expand_questions` keeps the same documents.
    """
    if limit is None:
        return list(rows)
    seen: dict[str, set[str]] = {}
    kept = []
    for index, row in enumerate(rows):
        bucket = row_bucket(row, column)
        unit = str(row["read_group"]) if "read_group" in row else f"#row{index}"
        units = seen.setdefault(bucket, set())
        if unit in units or len(units) < limit:
            units.add(unit)
            kept.append(row)
    return kept


def prepare_rows(rows: Sequence[Mapping[str, Any]], config: Any, source: str = "<rows>") -> list[dict[str, Any]]:
    """The rows an evaluation scores: ``--limit`` documents per bucket, one row per question, each checked."""
    selected = select_rows([dict(row) for row in rows], config.bucket_column, config.limit)
    expanded = expand_questions(selected, config.task, source)
    check_rows(expanded, config.task, source)
    return expanded


def build_longqa_rows(source: str | Path, num_docs: Sequence[int], num_questions: int | None, seed: int) -> list[dict]:
    """Long-text QA buckets built on the fly from raw HotpotQA/MuSiQue rows (memtrain.data.longqa)."""
    from memtrain.data.longqa import build_test_buckets, load_examples

    examples = load_examples(str(source))
    buckets = build_test_buckets(examples, tuple(num_docs), num_questions=num_questions, seed=seed)
    return [row for rows in buckets.values() for row in rows]
