"""The row contract's checks (memtrain.data.rows), shared by evaluation and training."""

from __future__ import annotations

import pytest

from memtrain.data.rows import check_rows


def test_rows_with_nothing_to_read_or_score_are_refused_as_training_refuses_them():
    """One validator for eval and training (memtrain.preflight.check_training_rows wraps this one)."""
    good = {"prompt": "q", "context": "c", "answers": ["a"]}
    with pytest.raises(ValueError, match=r"x.jsonl row 1: `context` is empty"):
        check_rows([good, {**good, "context": "  "}], "longqa", "x.jsonl")
    with pytest.raises(ValueError, match=r"row 0: `answers` must be a non-empty list of non-empty strings"):
        check_rows([{**good, "answers": [""]}], "longqa")
    check_rows([{"prompt": "q1\nq2", "context": "", "answers": [["a"], ["b"]]}], "search")
