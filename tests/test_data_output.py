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


def test_a_second_build_into_a_folder_being_built_is_refused_before_building(tmp_path):
    """A live build (another process) owns its output folder from its checks to its write; a second is refused at
    once (it used to build in full, then die); the claim ends with the write, or with the process (SIGKILL)."""
    import subprocess
    import sys

    from datasets import Dataset

    from memtrain.data.output import check_before_build, write_built_dataset
    from memtrain.preflight import PreflightError

    out = tmp_path / "built"
    code = "import sys, time; from memtrain.data.output import check_before_build; check_before_build(sys.argv[1], "
    code += "overwrite=False); print('building', flush=True); time.sleep(600)"
    first = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "building"
        with pytest.raises(PreflightError, match=rf"built is in use by another memtrain build \(pid {first.pid} on "):
            check_before_build(out, overwrite=False)
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    assert not out.exists()
    check_before_build(out, overwrite=False)
    check_before_build(out, overwrite=False)  # this process's own build may check again
    write_built_dataset(Dataset.from_list([{"a": 1}]), out, card="card", stats={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]  # the claim ended with the write
