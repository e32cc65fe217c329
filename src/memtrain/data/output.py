"""Atomic output folders for the dataset builders: a build is either complete on disk or not there at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output_dir(output_dir: str | Path) -> Iterator[Path]:
    """Yield a staging folder beside ``output_dir``; on success it replaces ``output_dir`` by rename.

    A failed or interrupted build removes its staging folder and leaves an earlier ``output_dir`` untouched, so a
    half-written dataset never looks complete.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.incomplete-", dir=output_dir.parent))
    try:
        yield staging
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
