"""The dataset builders' output: atomic folders (a build is complete on disk or not there at all), one write path
(``save_to_disk`` copy, parquet per split, card, stats) and the optional Hub push, shared by every builder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------------------------------
# One write + card + push path for every builder (build_dataset, build_longqa, build_searchqa)
# ---------------------------------------------------------------------------------------------------------------------


def parquet_path(split: str) -> str:
    """Where a split's parquet file lies inside a built folder (the card's ``configs`` point there)."""
    return f"data/{split}-00000-of-00001.parquet"


def card_data_files(splits: Sequence[str]) -> list[dict[str, str]]:
    """The ``data_files`` of a card's default config: ``load_dataset(folder)`` and the Hub read the parquet files."""
    return [{"split": split, "path": parquet_path(split)} for split in splits]


def data_files_yaml(splits: Sequence[str]) -> str:
    """:func:`card_data_files` as the YAML lines of a card template's ``data_files:`` list."""
    return "\n".join(f"  - split: {f['split']}\n    path: {f['path']}" for f in card_data_files(splits))


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless ``overwrite`` (the build replaces it atomically at the end)."""
    from memtrain.preflight import PreflightError

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise PreflightError(f"--output_dir {output_dir} is a file, not a folder; choose another --output_dir.")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise PreflightError(  # a ValueError: the command line prints it as one line, exit 2
            f"Output folder {output_dir} already exists and is not empty. Pass --overwrite_output_dir true to "
            "replace it, or choose another --output_dir."
        )


def check_before_build(
    output_dir: str | Path, *, overwrite: bool, push_to_hub: bool = False, hub_dataset_id: str | None = None
) -> Path:
    """Every check that can fail without building: output folder, write permission, Hub push (token, repo id).

    Builds take minutes to hours; a doomed write or push is found before, not after.
    """
    from memtrain.preflight import check_push, check_writable, claim_output_dir

    output_dir = Path(output_dir)
    claim = _BUILD_CLAIMS.get(output_dir.resolve())
    if claim is None or not claim.held:  # a second build into this folder is refused here, not after its build
        claim = _BUILD_CLAIMS[output_dir.resolve()] = claim_output_dir(output_dir, "memtrain build", beside=True)
    try:
        check_output_dir(output_dir, overwrite)
        check_writable(output_dir)
        if push_to_hub:
            check_push(hub_dataset_id, None)
    except BaseException:
        release_build_claim(output_dir)
        raise
    return output_dir


# Builds of this process that own their output folder (from check_before_build to the end of write_built_dataset).
_BUILD_CLAIMS: dict[Path, Any] = {}


def release_build_claim(output_dir: str | Path) -> None:
    """Give up this process's claim on a build's output folder (a build that failed before writing it)."""
    claim = _BUILD_CLAIMS.pop(Path(output_dir).resolve(), None)
    if claim is not None:
        claim.release()


def write_built_dataset(
    data: Any,
    output_dir: str | Path,
    *,
    card: Any,
    stats: Mapping[str, Any],
    overwrite: bool = False,
    push_to: str | None = None,
    private: bool = False,
    commit_message: str = "memtrain dataset",
) -> Path:
    """Write a build atomically, then push it if ``push_to`` names a Hub dataset repo.

    The folder holds ``dataset/`` (``save_to_disk`` of ``data``: a ``Dataset`` or a ``DatasetDict``),
    ``data/<split>-00000-of-00001.parquet`` per split (a ``Dataset`` is the ``train`` split), the card ``README.md``
    (its ``configs`` must point at the parquet files: see :func:`card_data_files`; ``load_dataset(folder)`` and the Hub
    read them) and ``build_stats.json``. A failed push leaves the written folder complete (``PushError``).
    """
    from datasets import DatasetDict

    output_dir = Path(output_dir)
    try:
        check_output_dir(output_dir, overwrite)
        splits = data if isinstance(data, DatasetDict) else {"train": data}
        with atomic_output_dir(output_dir) as staging:
            data.save_to_disk(str(staging / "dataset"))
            (staging / "data").mkdir()
            for split, dataset in splits.items():
                dataset.to_parquet(str(staging / parquet_path(split)))
            (staging / "README.md").write_text(str(card), encoding="utf-8")
            (staging / "build_stats.json").write_text(json.dumps(dict(stats), indent=2, default=str), encoding="utf-8")
    finally:
        release_build_claim(output_dir)
    logger.info("wrote %s: %s", output_dir, {split: len(dataset) for split, dataset in splits.items()})
    if push_to:
        from memtrain.hub import push_built_dataset

        url = push_built_dataset(
            output_dir, push_to, card=card if not isinstance(card, str) else None, private=private,
            commit_message=commit_message,
        )  # fmt: skip
        logger.info("pushed to %s", url)
    return output_dir
