"""scripts/build_dataset.py end to end: recipe + overrides -> save_to_disk + parquet + card; atomic; Hub push."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import refusal
from huggingface_hub import DatasetCard

from memtrain.data.build import BuildDatasetArguments
from memtrain.preflight import PreflightError


ROOT = Path(__file__).resolve().parents[1]
CPU_RECIPE = ROOT / "recipes" / "data" / "memtrain-wiki-cpu.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "corpora" / "2wikimultihopqa_corpus_300.json"


def _script_main():
    spec = importlib.util.spec_from_file_location("build_dataset_script", ROOT / "scripts" / "build_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _argv(output_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return [
        str(CPU_RECIPE),
        "--corpus", str(FIXTURE),
        "--num_documents", "6",
        "--output_dir", str(output_dir),
        "--tokenizer_name_or_path", str(tokenizer_dir),
        "--show_progress", "false",
        *extra,
    ]  # fmt: skip


def test_recipe_builds_disk_parquet_card_and_stats(tmp_path, smollm2_tokenizer_dir):
    import datasets

    out = _script_main()(_argv(tmp_path / "out", smollm2_tokenizer_dir))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "build_stats.json", "data", "dataset"]
    saved = datasets.load_from_disk(str(out / "dataset"))
    parquet = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert saved.to_list() == parquet.to_list() and len(saved) == 6
    for row in saved:
        assert row["answers"][0].lower() not in row["context"].lower()
        assert 400 <= row["num_tokens"] <= 2000 and row["num_paragraphs"] == 10  # the recipe's sizes
        assert row["entities"] and all(row["context"][e["start"] : e["end"]] == e["text"] for e in row["entities"])
    stats = json.loads((out / "build_stats.json").read_text())
    assert stats["build"]["built"] == 6 and stats["corpus"]["rows"] == 300
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "cc-by-sa-4.0" and card.data.configs[0]["data_files"][0]["split"] == "train"
    label, count = next(iter(stats["build"]["label_histogram"].items()))
    assert f"| {label} | {count} |" in card.text
    assert "6 built of 6 requested" in card.text and "`num_neighbours` | 4" in card.text
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left


def test_existing_output_and_failed_builds_leave_nothing_half_written(tmp_path, smollm2_tokenizer_dir):
    main = _script_main()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(PreflightError, match="--overwrite_output_dir"):
        main(_argv(existing, smollm2_tokenizer_dir))
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="one document needs 401"):
        main(_argv(tmp_path / "failed", smollm2_tokenizer_dir, "--num_random", "396"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_unknown_keys_and_missing_hub_id_are_refused(tmp_path, smollm2_tokenizer_dir):
    from memtrain.configs import RecipeError

    with pytest.raises(RecipeError, match="num_neighbors"):
        _script_main()(_argv(tmp_path / "x", smollm2_tokenizer_dir, "--num_neighbors", "3"))
    with pytest.raises(ValueError, match="push_to_hub needs hub_dataset_id"):
        BuildDatasetArguments(push_to_hub=True)


def test_push_to_hub_uploads_parquet_and_card_in_one_commit(tmp_path, smollm2_tokenizer_dir, monkeypatch):
    from test_hub import FakeHubServer

    hub = FakeHubServer(monkeypatch)  # the Hub's servers are the only thing replaced
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_fake_hub")
    extra = ("--push_to_hub", "true", "--hub_dataset_id", "someone/memtrain-wiki", "--hub_private", "true")
    _script_main()(_argv(tmp_path / "out", smollm2_tokenizer_dir, *extra))
    [repo] = hub.repos
    assert repo["repo_id"] == "someone/memtrain-wiki" and repo["repo_type"] == "dataset" and repo["private"] is True
    [commit] = hub.commits
    assert sorted(commit["files"]) == ["README.md", "build_stats.json", "data/train-00000-of-00001.parquet"]
    assert commit["repo_type"] == "dataset"


def test_a_doomed_push_is_found_before_the_build_and_a_failed_one_keeps_the_output(
    tmp_path, smollm2_tokenizer_dir, monkeypatch
):
    from huggingface_hub import constants
    from test_hub import FakeHubServer

    from memtrain.preflight import PreflightError, PushError

    push = ("--push_to_hub", "true", "--hub_dataset_id", "someone/memtrain-wiki")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PreflightError, match="the Hub is offline"):
        _script_main()(_argv(tmp_path / "offline", smollm2_tokenizer_dir, *push))
    assert not (tmp_path / "offline").exists() and not list(tmp_path.glob(".offline*"))  # nothing was built
    FakeHubServer(monkeypatch, fail_commits=True)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_fake_hub")
    with pytest.raises(PushError, match="holds the complete local output, but the push to someone/memtrain-wiki"):
        _script_main()(_argv(tmp_path / "out", smollm2_tokenizer_dir, *push))
    assert (tmp_path / "out" / "data" / "train-00000-of-00001.parquet").is_file()


@pytest.mark.parametrize(
    ("corpus", "extra", "pattern"),
    [
        (b"Caf\xe9 society in Paris was a thing of its own time and place.\n", [],
         r"Corpus file .*corpus.txt line 1 is not UTF-8 .*iconv"),
        (b"", [], r"corpus.txt: none of its 1 row\(s\) holds a paragraph .*\(1 empty, 0 shorter\)"),
        (b"Too short.\n", [], r"corpus.txt: none of its 1 row\(s\) holds a paragraph .*lower --min_words"),
        (None, ["--corpus", "builtin:wiki-sample", "--corpus_limit", "300", "--tokenizer_name_or_path", "no-such/x"],
         r"--tokenizer_name_or_path: Could not load the tokenizer 'no-such/x'"),
        (None, ["--corpus", "builtin:wiki-sample", "--output_dir", "EXISTING"],
         r"Output folder .*existing already exists and is not empty.*--overwrite_output_dir true"),
    ],
)  # fmt: skip
def test_bad_corpora_tokenizers_and_folders_are_one_line_errors(corpus, extra, pattern, tmp_path, capsys):
    import re

    if corpus is not None:
        (tmp_path / "corpus.txt").write_bytes(corpus)
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    extra = [str(tmp_path / "existing") if value == "EXISTING" else value for value in extra]
    argv = ["build-data", "--corpus", str(tmp_path / "corpus.txt"), "--num_documents", "2", "--output_dir",
            str(tmp_path / "out"), "--show_progress", "false", *extra]  # fmt: skip
    line = refusal(argv, capsys)
    assert re.search(pattern, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written: no folder, staging or lock
    assert [p.name for p in (tmp_path / "existing").iterdir()] == ["keep.txt"]
