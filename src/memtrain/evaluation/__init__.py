"""Evaluation harness: run a model as a memory agent (or with the whole context) on QA rows and report the scores.

Tasks (PAPER.md section 6 and the MemTrain ablations):

- ``longqa``: RULER-HotpotQA rows; accuracy = MemAgent's sub-EM (a SQuAD-normalised gold inside the normalised
  answer), plus EM and F1, per length bucket (``num_docs``).
- ``memtrain``: held-out MemTrain documents; masked-entity accuracy of the final answer (strict: last ``\\boxed{}``;
  lenient extraction) and, for the memory agent, recall accuracy of probes on the intermediate memories, scored
  like the trainer's ``memory_recall`` reward.
- ``search``: the MEM1-style search agent over a retriever; EM (averaged over a row's questions) and F1.

Modes: ``agent`` (the memory agent reads chunk by chunk; the search agent for ``search``) and ``full_context``
(the whole context in one final-answer prompt, skipped for rows over ``--max_context_tokens``).

Outputs in ``--output_dir``: ``results.json`` (every run: metrics per bucket + average + settings), ``results.md``
(the paper's layout: rows = model/mode, columns = buckets, Avg), ``accuracy_vs_length.png`` and
``trajectories/*.html`` for the first K examples. Runs of other models already in ``results.json`` are kept, so
evaluating several models into one folder builds one comparison table.

One module per concern: ``scoring`` (metrics of one reply, aggregation), ``config`` (the settings of a result),
``data`` (rows: loading, buckets; their checks are :mod:`memtrain.data.rows`), ``runner`` (memory agent, search agent, full context), ``report``
(results.json / .md and the accuracy-vs-length plot), ``harness`` (the whole evaluation) and ``cli``.
"""

from memtrain.data.rows import check_rows
from memtrain.evaluation.config import EvalConfig
from memtrain.evaluation.data import build_longqa_rows, load_rows, row_bucket, select_rows
from memtrain.evaluation.harness import evaluate
from memtrain.evaluation.report import PLOT_PNG, RESULTS_JSON, RESULTS_MD, merge_runs, render_markdown, write_reports
from memtrain.evaluation.runner import Evaluator, RunOutput
from memtrain.evaluation.scoring import (
    ALL_BUCKETS,
    MODES,
    PRIMARY_METRIC,
    TASKS,
    aggregate_scores,
    score_prediction,
)


__all__ = [
    "ALL_BUCKETS",
    "MODES",
    "PLOT_PNG",
    "PRIMARY_METRIC",
    "RESULTS_JSON",
    "RESULTS_MD",
    "TASKS",
    "EvalConfig",
    "Evaluator",
    "RunOutput",
    "aggregate_scores",
    "build_longqa_rows",
    "check_rows",
    "evaluate",
    "load_rows",
    "merge_runs",
    "render_markdown",
    "row_bucket",
    "score_prediction",
    "select_rows",
    "write_reports",
]
