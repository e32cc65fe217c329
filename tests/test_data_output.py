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


def test_stale_staging_of_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "built"
    # A builder killed (SIGKILL) mid-build: its staging folder names a process that no longer exists.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".built.incomplete-{dead.stdout.strip()}-abc123"
    (stale / "half").mkdir(parents=True)
    legacy = tmp_path / ".built.incomplete-k2j4x9"  # named before staging folders carried their pid
    legacy.mkdir()
    live_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".built.incomplete-{live_process.pid}-def456"
        live.mkdir()
        with atomic_output_dir(out) as staging:
            (staging / "rows.txt").write_text("rows")
        assert not stale.exists() and not legacy.exists()
        assert live.is_dir()  # another build, still running
    finally:
        live_process.kill()
        live_process.wait()


def test_built_folder_has_the_mode_of_a_plain_mkdir(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "built") as staging:
            (staging / "rows.txt").write_text("rows")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "built").stat().st_mode) == 0o755
