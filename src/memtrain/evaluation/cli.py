"""Command line of `memtrain eval` and scripts/evaluate.py (one parser for both)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memtrain.evaluation.config import EvalConfig
from memtrain.evaluation.data import build_longqa_rows, check_rows, load_rows
from memtrain.evaluation.harness import evaluate
from memtrain.evaluation.report import PLOT_PNG, RESULTS_JSON, RESULTS_MD, render_markdown
from memtrain.evaluation.scoring import MODES, TASKS


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """``--some_name`` (the recipe spelling) and ``--some-name`` both work."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*names, dest=name, **kwargs)


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = EvalConfig()
    _flag(parser, "model", help="Packaged name (smollm2-135m), local folder, adapter, .gguf or Hub id. With "
          "--base_url: the tokenizer (and default served model name).")  # fmt: skip
    _flag(parser, "base_url", help="Evaluate a model served by an OpenAI-compatible server (e.g. vLLM) at this URL.")
    _flag(parser, "served_model_name", help="Model name sent to --base_url (default: --model).")
    _flag(parser, "dataset", required=True, help="Rows (.jsonl/.json/.parquet) or a dataset folder.")
    _flag(parser, "output_dir", required=True, type=Path, help="Where results.json/.md, the plot and pages go.")
    _flag(parser, "task", choices=TASKS, default=defaults.task, help="longqa (default), memtrain or search.")
    _flag(parser, "modes", nargs="+", choices=MODES, default=list(defaults.modes), help="agent and/or full_context.")
    _flag(parser, "label", help="Row name in the results table (default: the model).")
    _flag(parser, "num_samples", type=int, default=defaults.num_samples, help="Samples per question (default 1).")
    _flag(parser, "temperature", type=float, default=defaults.temperature, help="0 (default) = greedy.")
    _flag(parser, "top_p", type=float, default=defaults.top_p)
    _flag(parser, "top_k", type=int, default=defaults.top_k)
    _flag(parser, "seed", type=int, default=defaults.seed)
    _flag(parser, "chunk_size", type=int, default=defaults.chunk_size, help="Tokens per chunk (paper: 5000).")
    _flag(parser, "max_chunks", type=int, default=defaults.max_chunks)
    _flag(parser, "max_memory_tokens", type=int, default=defaults.max_memory_tokens)
    _flag(parser, "max_answer_tokens", type=int, default=defaults.max_answer_tokens)
    _flag(parser, "max_context_tokens", type=int, default=defaults.max_context_tokens,
          help="Full-context mode: prompts longer than this are skipped (reported per bucket).")  # fmt: skip
    _flag(parser, "answer_extraction", choices=("strict", "lenient"), default=defaults.answer_extraction,
          help="longqa/search answer: strict = last \\boxed{} only; lenient (default) also takes unboxed replies.")  # fmt: skip
    _flag(parser, "bucket_column", default=defaults.bucket_column, help="Column grouping rows (default num_docs).")
    _flag(parser, "batch_size", type=int, default=defaults.batch_size, help="Rows per batched rollout.")
    _flag(parser, "limit", type=int, help="Evaluate the first LIMIT rows of each bucket.")
    _flag(parser, "num_trajectory_pages", type=int, default=defaults.num_trajectory_pages,
          help="Trajectory HTML pages for the first K examples of each mode (default 4).")  # fmt: skip
    _flag(parser, "recall_samples", type=int, default=defaults.recall_samples, help="memtrain: answers per probe.")
    _flag(parser, "recall_chunk_policy", choices=("any", "latest"), default=defaults.recall_chunk_policy)
    _flag(parser, "longqa_num_docs", type=int, nargs="+",
          help="Build long-text QA buckets with these document counts from raw HotpotQA/MuSiQue rows in --dataset.")  # fmt: skip
    _flag(parser, "longqa_num_questions", type=int, help="Questions per built bucket (default: all).")
    _flag(parser, "retriever_corpus", help="search: passages file for a local BM25 retriever.")
    _flag(parser, "retriever_url", help="search: URL of a running retrieval server.")
    _flag(parser, "search_max_turns", type=int, default=defaults.search_max_turns, help="search: turns (MEM1: 6).")
    _flag(parser, "search_topk", type=int, default=defaults.search_topk, help="search: passages per query.")
    _flag(parser, "search_max_new_tokens", type=int, default=defaults.search_max_new_tokens)
    _flag(parser, "max_batch_size", type=int, help="transformers backend: sequences per generate call.")
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    names = EvalConfig.__dataclass_fields__
    return EvalConfig(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def run_eval(args: argparse.Namespace) -> int:
    """The ``memtrain eval`` handler: validate, load data, load or connect to the model, evaluate, report."""
    config = config_from_args(args)  # bad settings fail before any load
    if args.model is None:
        raise ValueError("--model is required (with --base_url it names the tokenizer of the served model).")
    if args.longqa_num_docs:
        rows = build_longqa_rows(args.dataset, args.longqa_num_docs, args.longqa_num_questions, config.seed)
    else:
        rows = load_rows(args.dataset)
    check_rows(rows, config.task, args.dataset)

    retriever = None
    if config.task == "search":
        from memtrain.retrieval import RemoteRetriever, Retriever

        if args.retriever_url:
            retriever = RemoteRetriever(args.retriever_url)
        elif args.retriever_corpus:
            retriever = Retriever.from_corpus(args.retriever_corpus)

    start = time.perf_counter()
    if args.base_url:
        from memtrain.agent.openai_backend import OpenAICompatibleGenerator
        from memtrain.data.documents import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        generator = OpenAICompatibleGenerator(args.base_url, args.served_model_name or args.model, tokenizer)
    else:
        from memtrain.agent.generation import TransformersGenerator
        from memtrain.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(args.model)
        generator = TransformersGenerator(model, tokenizer, max_batch_size=args.max_batch_size)
    loaded = time.perf_counter()
    extra = {"model": args.model, "base_url": args.base_url, "dataset": str(args.dataset)}
    results = evaluate(rows, tokenizer, generator, config, args.output_dir, args.label or args.model, retriever, extra)
    print(
        f"[memtrain eval] model ready in {loaded - start:.1f}s, evaluated in {time.perf_counter() - loaded:.1f}s; "
        f"wrote {args.output_dir / RESULTS_JSON}, {RESULTS_MD}, {PLOT_PNG}",
        file=sys.stderr,
    )
    print(render_markdown({"runs": results["runs"][-len(config.modes) :]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_eval_arguments(argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run_eval(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
