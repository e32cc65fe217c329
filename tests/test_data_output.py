"""Atomic output folders: a build replaces the old folder whole, or leaves it as it was."""

from __future__ import annotations

import pytest

from memtrain.data.output import atomic_output_dir


def test_success_replaces_the_folder_and_failure_keeps_the_old_one(tmp_path):
    out = tmp_path / "built"
    with atomic_output_dir(out) as staging:
        (staging / "rows.txt").write_text("first")
    assert (out / "rows.txt").read_text() == "first"

    with pytest.raises(RuntimeError), atomic_output_dir(out) as staging:
        (staging / "rows.txt").write_text("half written")
        raise RuntimeError("interrupted")
    assert (out / "rows.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]  # no staging folder left behind

    with atomic_output_dir(out) as staging:
        (staging / "other.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["other.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]
