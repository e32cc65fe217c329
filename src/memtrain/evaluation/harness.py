"""The whole evaluation: every mode of a config over the rows, scored, with trajectory pages and the reports."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memtrain.evaluation.config import EvalConfig
from memtrain.evaluation.data import prepare_rows, row_bucket
from memtrain.evaluation.report import RESULTS_JSON, _slug, merge_runs, write_reports
from memtrain.evaluation.runner import Evaluator
from memtrain.evaluation.scoring import aggregate_scores


SCORED_ROWS = "scored_rows.jsonl"
# Settings that do not change a scored row: a resumed run may differ in them.
_NOT_IN_FINGERPRINT = ("modes", "num_trajectory_pages")


class ResumeError(ValueError):
    """``scored_rows.jsonl`` holds rows of this model scored with other settings: mixing them would be wrong."""


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """A short hash of the settings that decide a scored row (the same settings resume, others refuse)."""
    kept = {key: value for key, value in settings.items() if key not in _NOT_IN_FINGERPRINT}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ScoredRows:
    """The rows scored so far, one JSON line each, appended as they are scored, so a killed run resumes.

    A line: ``label``, ``mode``, ``task``, ``fingerprint``, ``index``, ``id``, ``replies``, ``scores``, ``seconds``.
    Lines of other models (labels) or tasks are kept untouched; a truncated last line (a kill mid-write) is ignored.
    """

    def __init__(self, output_dir: Path, label: str, task: str, fingerprint: str, settings: Mapping[str, Any],
                 overwrite: bool = False) -> None:  # fmt: skip
        self.path = output_dir / SCORED_ROWS
        self.label, self.task, self.fingerprint = label, task, fingerprint
        self.records: dict[tuple[str, int], dict[str, Any]] = {}
        others, stale = [], []
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            valid = []
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: its rows are run again
                    continue
                valid.append(line)
                if (record.get("label"), record.get("task")) != (label, task):
                    others.append(line)
                elif record.get("fingerprint") != fingerprint:
                    stale.append(record)
                else:
                    self.records[(record["mode"], record["index"])] = record
            if len(valid) != len(text.splitlines()) or (text and not text.endswith("\n")):
                self.path.write_text("".join(line + "\n" for line in valid), encoding="utf-8")  # appendable again
        if stale and not overwrite:
            before = stale[0].get("settings", {})
            changed = sorted(
                k for k in {*before, *settings} - set(_NOT_IN_FINGERPRINT) if before.get(k) != settings.get(k)
            )
            raise ResumeError(
                f"{self.path} holds {len(stale)} rows of {label!r} ({task}) scored with other settings "
                f"(changed: {', '.join(changed) or 'the dataset rows'}); rerun with the same settings to resume, or "
                "pass --overwrite true to discard them (or use another --output_dir)."
            )
        if overwrite and (stale or self.records):
            output_dir.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(line + "\n" for line in others), encoding="utf-8")
            self.records = {}
        self._settings = dict(settings)

    def get(self, mode: str, index: int, row_id: str) -> dict[str, Any] | None:
        record = self.records.get((mode, index))
        if record is not None and record["id"] != row_id:
            raise ResumeError(
                f"{self.path}: row {index} was scored as id {record['id']!r} but is {row_id!r} now (the dataset "
                "changed); pass --overwrite true to discard the scored rows, or use another --output_dir."
            )
        return record

    def add(self, mode: str, entries: Sequence[dict[str, Any]]) -> None:
        """Append one batch's scored rows (then flush: they survive a kill)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for entry in entries:
                record = {"label": self.label, "mode": mode, "task": self.task, "fingerprint": self.fingerprint,
                          "settings": self._settings, **entry}  # fmt: skip
                self.records[(mode, entry["index"])] = record
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")  # NaN stays NaN (read back by json)
            handle.flush()


class Progress:
    """``rows done / total, elapsed, ETA`` on stderr after each batch (the rate counts this session's rows only)."""

    def __init__(self, name: str, total: int, done: int) -> None:
        self.name, self.total, self.done, self.start_done = name, total, done, done
        self.start = time.perf_counter()
        if done:
            self._print(f"resuming: {done}/{total} rows already scored")

    def _print(self, text: str) -> None:
        print(f"[memtrain eval] {self.name}: {text}", file=sys.stderr, flush=True)

    def starting(self, batch_index: int, num_batches: int, rows: int) -> None:
        """A line before each batch: a batch of long documents can take minutes before its first result."""
        self._print(f"batch {batch_index + 1}/{num_batches}: scoring {rows} row(s)...")

    def update(self, rows: int) -> None:
        self.done += rows
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        self._print(f"{self.done}/{self.total} rows ({100 * self.done / max(self.total, 1):.0f}%), "
                    f"{elapsed:.1f}s elapsed, ETA {eta:.1f}s")  # fmt: skip


def run_settings(config: EvalConfig, extra_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What results.json records as a run's settings (and what a resumed run must match)."""
    return {**asdict(config), "modes": list(config.modes), **dict(extra_settings or {})}


def check_resume(
    output_dir: str | Path, label: str, config: EvalConfig, extra_settings: Mapping[str, Any] | None = None
) -> None:
    """Refuse, before any model loads, an --output_dir whose scored rows of this model have other settings."""
    settings = run_settings(config, extra_settings)
    ScoredRows(Path(output_dir), label, config.task, settings_fingerprint(settings), settings)


def evaluate(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    generator: Any,
    config: EvalConfig,
    output_dir: str | Path,
    label: str = "model",
    retriever: Any = None,
    extra_settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run every mode of ``config`` on ``rows``, write the outputs into ``output_dir``, return results.json.

    Rows are scored batch by batch into ``scored_rows.jsonl``; a rerun with the same settings skips the rows
    already there (a killed evaluation resumes), one with other settings is refused unless ``overwrite``.
    Trajectory pages are written for the first rows run in this session.
    """
    from memtrain.viz import save_trajectory_html

    rows = prepare_rows(rows, config)
    buckets = [row_bucket(row, config.bucket_column) for row in rows]
    ids = [str(row.get("id", i)) for i, row in enumerate(rows)]
    groups = [str(row.get("read_group", ids[i])) for i, row in enumerate(rows)]  # the document each row reads
    output_dir = Path(output_dir)
    settings = run_settings(config, extra_settings)
    store = ScoredRows(output_dir, label, config.task, settings_fingerprint(settings), settings, overwrite)
    evaluator = Evaluator(tokenizer, generator, config, retriever)
    runs = []
    for mode in config.modes:
        units = evaluator.read_units(rows, mode)
        chunks = [units[start : start + config.batch_size] for start in range(0, len(units), config.batch_size)]
        done = sum(store.get(mode, i, ids[i]) is not None for i in range(len(rows)))
        progress = Progress(f"{label}/{mode}", len(rows), done)
        pages: list[str] = []
        unpaged = set(groups)  # documents without a page yet: pages go to distinct documents first
        for batch_index, chunk in enumerate(chunks):
            indices = [i for unit in chunk for i in unit]
            # A batch runs whole (its seed and its read_once groups are per batch); a kill between its rows left
            # some of them scored: those keep their stored record, only the others are added and counted.
            scored = {i for i in indices if store.get(mode, i, ids[i]) is not None}
            if len(scored) == len(indices):
                continue
            batch = [rows[i] for i in indices]
            progress.starting(batch_index, len(chunks), len(indices) - len(scored))
            output = evaluator.run(batch, mode, batch_index=batch_index)
            scores = evaluator.score(batch, output)
            for j, i in enumerate(indices):
                left = config.num_trajectory_pages - len(pages)
                if output.trajectories[j] and left > 0 and (groups[i] in unpaged or left > len(unpaged)):
                    unpaged.discard(groups[i])
                    path = output_dir / "trajectories" / f"{_slug(label)}-{mode}-{i:03d}-{_slug(ids[i])}.html"
                    replies = output.replies[j] or []
                    for k, (trajectory, sample_scores) in enumerate(zip(output.trajectories[j], scores[j] or [])):
                        # the reply scored can differ from the trajectory's final answer (read_once: one read, one
                        # answer per question)
                        trajectory.metadata.update({"answers": list(rows[i]["answers"]), "scores": sample_scores,
                                                    "scored_reply": replies[k] if k < len(replies) else None})  # fmt: skip
                    save_trajectory_html(output.trajectories[j], path, title=f"{label} / {mode}: {ids[i]}")
                    pages.append(str(path.relative_to(output_dir)))
            seconds = output.seconds / len(indices)
            store.add(mode, [{"index": i, "id": ids[i], "replies": output.replies[j], "scores": scores[j],
                              "seconds": seconds} for j, i in enumerate(indices) if i not in scored])  # fmt: skip
            progress.update(len(indices) - len(scored))
        records = [store.get(mode, i, ids[i]) for i in range(len(rows))]
        scores = [record["scores"] for record in records]
        predictions = [
            {"id": ids[i], "bucket": buckets[i], "replies": record["replies"], "scores": record["scores"]}
            for i, record in enumerate(records)
        ]
        runs.append(
            {
                "label": label,
                "mode": mode,
                "task": config.task,
                "metrics": aggregate_scores(scores, buckets),
                "settings": settings,
                "seconds": round(sum(record["seconds"] for record in records), 3),
                "trajectory_pages": pages,
                "predictions": predictions,
            }
        )
    previous = None
    if (output_dir / RESULTS_JSON).is_file():
        previous = json.loads((output_dir / RESULTS_JSON).read_text(encoding="utf-8"))
    results = merge_runs(previous, runs)
    write_reports(results, output_dir)
    return results
