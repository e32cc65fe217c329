"""The memtrain CLI: the subcommand registry and `memtrain read` end to end on a tiny local model."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from memtrain import cli
from memtrain.agent.trajectory import load_trajectories


@pytest.fixture
def model_dir(tiny_checkpoint):
    """A tiny random Llama saved with the real SmolLM2 tokenizer: a local model folder like any other."""
    return tiny_checkpoint


@pytest.fixture
def context_file(tmp_path):
    path = tmp_path / "context.txt"
    path.write_text(" ".join(f"Paragraph {i}: the Rhone flows through Lyon." for i in range(30)), encoding="utf-8")
    return path


def read_args(model_dir, context_file, *extra: str) -> list[str]:
    # `--chunk-size` (the old spelling) still works beside `--chunk_size`: TRL's parser takes both
    return [
        "read", "--model", str(model_dir), "--context_file", str(context_file), "--question", "Which river?",
        "--chunk-size", "64", "--max_chunks", "3", "--max_memory_tokens", "4", "--max_answer_tokens", "5", *extra,
    ]  # fmt: skip


def test_read_is_registered_and_help_lists_it(capsys):
    assert "read" in cli.SUBCOMMANDS
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "read" in capsys.readouterr().out


def test_new_subcommands_plug_into_the_registry(capsys, monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))

    @cli.register_subcommand("echo")
    def add_echo(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = subparsers.add_parser("echo")
        parser.add_argument("word")
        parser.set_defaults(handler=lambda args: print(args.word) or 3)
        return parser

    assert cli.main(["echo", "hello"]) == 3
    assert capsys.readouterr().out == "hello\n"
    with pytest.raises(ValueError, match="already registered"):
        cli.register_subcommand("echo")(lambda subparsers: None)


def test_no_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_a_bad_value_is_one_line_naming_the_option(capsys):
    """Not argparse's usage dump: one line, the option and what is wrong with its value, exit 2."""
    argv = ["read", "--model", "m", "--context-file", "x.txt", "--question", "q", "--max-chunks", "two"]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("memtrain read: error: --max_chunks: invalid int value: 'two'")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["read", "--context_file", "x.txt", "--question", "q"], "--model is required"),
        (["read", "--model", "m", "--context_file", "x.txt", "--question", "q", "--chunk_size", "0"], "chunk_size"),
        (["read", "--model", "m", "--context_file", "x.txt", "--question", "q", "--chunk_sise", "8"], "chunk_size"),
    ],
)
def test_bad_settings_are_one_line_errors(capsys, argv, message):
    """A missing key, a bad value or a misspelt key: exit 2 and one line naming it, before any model loads."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("memtrain read: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_read_help_lists_every_key_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["read", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("--model", "--context_file", "--question", "--chunk_size", "--max_chunks", "--max_problem_tokens",
                "--max_memory_tokens", "--max_answer_tokens", "--update_template", "--final_template", "--backend",
                "--trace_html", "--seed"):  # fmt: skip
        assert key in out, key


def test_read_takes_a_recipes_agent_settings(model_dir, context_file, tmp_path, capsys):
    """`memtrain read --config recipe.yaml`: the recipe's chunking, budgets and templates; the command line wins."""
    import yaml

    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "smollm2-135m.yaml").read_text())
    recipe.update(model_name_or_path=str(model_dir), max_chunks=2, max_memory_tokens=4, max_answer_tokens=5,
                  final_template="Q: {problem}\nNotes: {memory}\nReply:")  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    trace = tmp_path / "t.json"
    argv = ["read", "--config", str(tmp_path / "r.yaml"), "--context_file", str(context_file), "--question", "Which?",
            "--chunk_size", "48", "--trace_json", str(trace)]  # fmt: skip
    assert cli.main(argv) == 0
    (trajectory,) = load_trajectories(trace)
    assert trajectory.num_chunks == 2 and all(len(call.completion_ids) <= 4 for call in trajectory.calls[:2])
    prompt = tokenizer_of(model_dir).decode(trajectory.calls[-1].prompt_ids)
    assert "Notes: " in prompt and "Reply:" in prompt
    # the recipe's chunk_size is 64, the command line's 48: 2 chunks of <= 48 tokens were read
    assert trajectory.metadata["context_tokens"] - trajectory.truncated_tokens <= 96


def tokenizer_of(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def test_missing_context_file_is_a_clear_error_before_loading_any_model(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    code = cli.main(["read", "--model", "/does/not/exist", "--context-file", str(missing), "--question", "q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "memtrain read: error: --context_file" in err and str(missing) in err


def test_read_answers_and_saves_its_trace(model_dir, context_file, tmp_path, capsys):
    trace_json, trace_html = tmp_path / "out" / "trace.json", tmp_path / "out" / "trace.html"
    argv = read_args(model_dir, context_file, "--trace-json", str(trace_json), "--trace-html", str(trace_html))
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    (trajectory,) = load_trajectories(trace_json)
    assert captured.out == trajectory.answer + "\n"
    assert trajectory.num_chunks == 3 and trajectory.truncated_tokens > 0
    assert [call.kind for call in trajectory.calls] == ["update"] * 3 + ["final"]
    assert all(len(call.completion_ids) <= 4 for call in trajectory.calls[:3])
    assert "read 3 chunks" in captured.err
    # progress while it reads (a 70-chunk text used to print nothing for minutes), one line per agent step
    progress = [line for line in captured.err.splitlines() if re.match(r"\[memtrain read\] (chunk|answered)", line)]
    assert [line.split(" (")[0] for line in progress] == [
        "[memtrain read] chunk 1/3 read", "[memtrain read] chunk 2/3 read", "[memtrain read] chunk 3/3 read",
        "[memtrain read] answered",
    ]  # fmt: skip
    assert "<!DOCTYPE html>" in trace_html.read_text(encoding="utf-8")


def test_seeded_sampling_is_reproducible(model_dir, context_file, capsys):
    argv = read_args(model_dir, context_file, "--temperature", "1.0", "--seed", "4")
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first
    assert cli.main(read_args(model_dir, context_file, "--temperature", "-1")) == 2
    assert "--temperature must be >= 0" in capsys.readouterr().err


def test_forwarded_subcommands_run_the_scripts_entry_points(tmp_path, capsys):
    from memtrain.cli import main

    fixtures = Path(__file__).parent / "fixtures"
    out = tmp_path / "searchqa"
    code = main(
        ["build-searchqa", "--questions", str(fixtures / "search" / "nq_test_17.jsonl"),
         str(fixtures / "longqa" / "hotpotqa_train_12.json"), "--num_rows", "3", "--output_dir", str(out)]
    )  # fmt: skip
    # the builders write the dataset at the top or (the shared output layout) in its `dataset/` subfolder
    assert code == 0 and any((folder / "dataset_info.json").is_file() for folder in (out, out / "dataset"))
    # a recipe that is not there is a user error (exit 2, no traceback), reported before anything loads
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err


def test_read_refuses_an_empty_context_before_loading_the_model(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    code = cli.main(["read", "--model", "/does/not/exist", "--context-file", str(empty), "--question", "q"])
    assert code == 2
    assert "memtrain read: error: --context_file" in capsys.readouterr().err


def test_read_warns_about_what_it_did_not_read(model_dir, context_file, capsys):
    long_question = "Which river flows through Lyon " * 20 + "?"
    argv = read_args(model_dir, context_file, "--max_problem_tokens", "16")
    argv[argv.index("--question") + 1] = long_question
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: the context has \d+ tokens .* \d+ tokens from its middle were NOT read", err)
    assert re.search(r"pass --max_chunks \d+ to read all of it", err)
    assert re.search(r"warning: the question was cut to --max_problem_tokens 16: its last \d+ tokens", err)
    assert cli.main(read_args(model_dir, context_file, "--max-chunks", "40")) == 0
    assert "warning" not in capsys.readouterr().err


def test_train_whose_push_fails_is_a_one_line_error(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from conftest import save_built_documents
    from test_hub import FakeHubServer
    from test_train import SECRET, full_recipe, write_recipe

    FakeHubServer(monkeypatch, fail_commits=True)
    documents = save_built_documents(tmp_path / "docs", num_documents=2, corpus_limit=200, seed=1)
    recipe = full_recipe(tiny_checkpoint, documents, tmp_path / "run", push_to_hub=True, hub_model_id="me/t")
    assert cli.main(["train", str(write_recipe(tmp_path, recipe)), "--hub_token", SECRET]) == 2
    err = capsys.readouterr().err
    assert "memtrain train: error: the run finished and" in err and "Traceback" not in err
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "command,keys",
    [
        ("read", ["--model", "--context_file", "--question", "--chunk_size", "--max_problem_tokens", "--backend"]),
        ("eval", ["--model", "--dataset", "--dataset_config", "--prompt_column", "--output_dir", "--chunk_size"]),
        ("train", ["--model_name_or_path", "--dataset_name", "--chunk_size", "--recall_samples", "--search_topk"]),
        ("build-data", ["--output_dir"]),
        ("build-longqa", ["--output_dir"]),
        ("build-searchqa", ["--questions", "--num_rows", "--output_dir"]),
        ("serve-retriever", ["--corpus", "--method", "--port", "--topk"]),
    ],
)
def test_every_entry_point_help_exits_0_and_lists_its_keys(capsys, command, keys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: memtrain {command} "), out.splitlines()[0]
    missing = [key for key in keys if key not in out]
    assert not missing, f"memtrain {command} --help does not list {missing}"


def test_a_command_starts_without_bitsandbytes_kernel_hub_noise():
    """bitsandbytes' CPU backend logs a failed optional Hub-kernel load at import; a user must not see it."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import sys; from memtrain.cli import main; sys.exit(main(['train', '--help']))"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage: memtrain train" in done.stdout
    assert "kernels-community" not in done.stdout + done.stderr


def test_scripts_of_forwarded_commands_give_one_line_errors(tmp_path):
    """`python scripts/build_dataset.py bad.yaml` printed a RecipeError traceback; now the script's one line, exit 2."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("num_documents: many\n")
    for script in ("build_dataset.py", "build_longqa.py", "build_searchqa.py", "serve_retriever.py"):
        done = subprocess.run(
            [sys.executable, f"scripts/{script}", "--config", str(tmp_path / "missing.yaml")],
            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        lines = done.stderr.strip().splitlines()
        prefix = "serve_retriever" if script == "serve_retriever.py" else script  # it names itself
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{prefix}: error:"), done.stderr
