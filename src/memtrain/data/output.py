"""Atomic output folders for the dataset builders: a build is either complete on disk or not there at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_staging(output_dir: str | Path) -> list[Path]:
    """Remove the staging (and swapped-out) folders of builds of ``output_dir`` whose process is gone.

    A builder killed with SIGKILL (or a lost machine) cannot clean up after itself; its hidden
    ``.<name>.incomplete-<pid>-*`` folder (up to a whole dataset) would stay forever. A live build's is kept.
    """
    output_dir = Path(output_dir)
    if not output_dir.parent.is_dir():
        return []
    removed = []
    for prefix in (f".{output_dir.name}.incomplete-", f".{output_dir.name}.old-"):
        for folder in output_dir.parent.glob(f"{prefix}*"):
            pid_text = folder.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output_dir(output_dir: str | Path) -> Iterator[Path]:
    """Yield a staging folder beside ``output_dir``; on success it replaces ``output_dir`` by rename.

    A failed or interrupted build removes its staging folder and leaves an earlier ``output_dir`` untouched, so a
    half-written dataset never looks complete. Staging folders of builds killed before they could clean up are
    removed first. The result has the mode a plain ``mkdir`` gives (``mkdtemp`` alone makes it 0700).
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.incomplete-{os.getpid()}-", dir=output_dir.parent))
    try:
        yield staging
        staging.chmod(0o777 & ~_umask())
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            output_dir.rename(old)
            staging.rename(output_dir)
            shutil.rmtree(old)
        else:
            staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
