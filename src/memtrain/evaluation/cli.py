"""Command line of `memtrain eval` and scripts/evaluate.py: ``[--config FILE] [--key value ...]``.

The keys are the fields of :class:`~memtrain.evaluation.config.EvalArguments` and
:class:`~memtrain.evaluation.config.EvalConfig` (which holds the memory agent's ``AgentConfig`` and the search
agent's ``SearchAgentArguments``), parsed by TRL's parser as training's recipes are. ``--config`` takes an
evaluation YAML or a training recipe, whose agent settings and model are then used (see
:func:`memtrain.configs.settings_from_file`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from memtrain.configs import RecipeError, parse_settings
from memtrain.evaluation.backend import load_generator, require_backend
from memtrain.evaluation.config import EvalArguments, EvalConfig
from memtrain.evaluation.data import build_longqa_rows, load_rows, map_columns, prepare_rows
from memtrain.evaluation.harness import check_resume, evaluate
from memtrain.evaluation.report import PLOT_PNG, RESULTS_JSON, RESULTS_MD, render_markdown
from memtrain.retrieval import build_retriever


EVAL_DATACLASSES = (EvalArguments, EvalConfig)


def parse_eval_args(argv: Sequence[str] | None, prog: str = "memtrain eval") -> tuple[EvalArguments, EvalConfig]:
    """Both dataclasses from the command line (and ``--config``); bad keys and values raise ValueError."""
    args, config = parse_settings(argv, EVAL_DATACLASSES, prog)
    if args.model is None:
        raise ValueError("--model is required (with --base_url it names the tokenizer of the served model).")
    if args.dataset is None:
        raise ValueError("--dataset is required: a Hub dataset id, a local file or folder of rows.")
    if args.output_dir is None:
        raise ValueError("--output_dir is required: the folder results.json, results.md and the pages go to.")
    return args, config


def run_eval(argv: Sequence[str] | None = None, prog: str = "memtrain eval") -> int:
    """Validate, load data, load or connect to the model, evaluate, report. User errors raise ValueError."""
    args, config = parse_eval_args(argv, prog)  # bad settings fail before any load
    require_backend(args.backend)
    if args.longqa_num_docs:
        rows = build_longqa_rows(args.dataset, args.longqa_num_docs, args.longqa_num_questions, config.seed)
    else:
        rows = load_rows(args.dataset, args.dataset_config, args.dataset_split)
    rows = map_columns(rows, args.dataset, args.prompt_column, args.context_column, args.answers_column)
    rows = prepare_rows(rows, config, args.dataset)  # every row checked before the model loads
    extra = {"model": args.model, "base_url": args.base_url, "backend": args.backend, "dataset": str(args.dataset),
             "dataset_config": args.dataset_config, "dataset_split": args.dataset_split,
             "columns": [args.prompt_column, args.context_column, args.answers_column]}  # fmt: skip
    output_dir = Path(args.output_dir)
    label = args.label or args.model
    if not args.overwrite:
        check_resume(output_dir, label, config, extra)  # other settings in --output_dir: refused before the load
    retriever = build_retriever(config) if config.task == "search" else None

    start = time.perf_counter()
    tokenizer, generator = load_generator(
        args.model,
        args.backend,
        base_url=args.base_url,
        served_model_name=args.served_model_name,
        seed=config.seed,
        max_batch_size=args.max_batch_size,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        vllm_max_model_length=args.vllm_max_model_length,
    )
    loaded = time.perf_counter()
    results = evaluate(rows, tokenizer, generator, config, output_dir, label, retriever, extra, args.overwrite)
    print(
        f"[memtrain eval] model ready in {loaded - start:.1f}s, evaluated in {time.perf_counter() - loaded:.1f}s; "
        f"wrote {output_dir / RESULTS_JSON}, {RESULTS_MD}, {PLOT_PNG}",
        file=sys.stderr,
    )
    print(render_markdown({"runs": results["runs"][-len(config.modes) :]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/evaluate.py: the same keys as `memtrain eval`; a user error is one line and exit code 2."""
    try:
        return run_eval(argv, prog="evaluate.py")
    except (RecipeError, ValueError, FileNotFoundError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
