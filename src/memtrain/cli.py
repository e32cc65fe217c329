"""The ``memtrain`` command line: one entry point whose subcommands register themselves in ``SUBCOMMANDS``.

A new subcommand is a function that adds its subparser and sets ``handler`` (a function of the parsed args that
returns an exit code); decorate it with :func:`register_subcommand` and ``memtrain <name>`` exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path


SubparserAdder = Callable[[argparse._SubParsersAction], argparse.ArgumentParser]
SUBCOMMANDS: dict[str, SubparserAdder] = {}


class CliError(Exception):
    """A user error: printed as ``memtrain <command>: error: ...`` with exit code 2, without a traceback."""


def register_subcommand(name: str) -> Callable[[SubparserAdder], SubparserAdder]:
    def decorator(add: SubparserAdder) -> SubparserAdder:
        if name in SUBCOMMANDS and SUBCOMMANDS[name] is not add:
            raise ValueError(f"A memtrain subcommand named {name!r} is already registered.")
        SUBCOMMANDS[name] = add
        return add

    return decorator


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


@register_subcommand("read")
def add_read(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "read",
        help="Read a long text chunk by chunk into a bounded memory, then answer a question from the memory.",
        description="Run the memory agent once: print the answer; optionally save the trajectory (JSON, HTML).",
    )
    parser.add_argument("--model", required=True, help="Packaged name (smollm2-135m), local folder, .gguf or Hub id.")
    parser.add_argument("--context-file", required=True, help="UTF-8 text file to read ('-' reads stdin).")
    parser.add_argument("--question", required=True, help="The question (the agent's problem).")
    parser.add_argument("--chunk-size", type=_positive_int, default=5000, help="Tokens per chunk (default 5000).")
    parser.add_argument("--max-chunks", type=_positive_int, default=8, help="Chunks read at most (default 8).")
    parser.add_argument(
        "--max-problem-tokens", type=_positive_int, default=1024, help="Question budget; longer keeps its start."
    )
    parser.add_argument("--max-memory-tokens", type=_positive_int, default=1024, help="Memory budget (default 1024).")
    parser.add_argument("--max-answer-tokens", type=_positive_int, default=1024, help="Answer budget (default 1024).")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default) decodes greedily; > 0 samples (see --seed)."
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass when sampling (default 1).")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed: the same seed gives the same run.")
    parser.add_argument("--trace-json", type=Path, help="Save the trajectory (every model call) as JSON here.")
    parser.add_argument("--trace-html", type=Path, help="Save the trajectory viewer (HTML) here.")
    parser.set_defaults(handler=run_read)
    return parser


def _read_context(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    file = Path(path)
    if not file.is_file():
        raise CliError(f"--context-file {path}: no such file; pass a UTF-8 text file (or '-' for stdin).")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CliError(f"--context-file {path}: not UTF-8 text ({error}); convert it to UTF-8 first.") from None


def run_read(args: argparse.Namespace) -> int:
    # Check the user's input before the heavy imports and the model load, so a typo fails in milliseconds.
    if args.temperature < 0:
        raise CliError(f"--temperature must be >= 0, got {args.temperature}.")
    if not 0 < args.top_p <= 1:
        raise CliError(f"--top-p must be in (0, 1], got {args.top_p}.")
    context = _read_context(args.context_file)
    if not context.strip():
        raise CliError(f"--context-file {args.context_file} is empty: there is nothing to read; pass the long text.")
    if not args.question.strip():
        raise CliError("--question is empty; ask the question the memory agent should answer.")

    from memtrain.agent.generation import SamplingConfig, TransformersGenerator
    from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
    from memtrain.agent.trajectory import save_trajectories
    from memtrain.models import load_model_and_tokenizer
    from memtrain.viz import save_trajectory_html

    config = AgentConfig(
        chunk_size=args.chunk_size,
        max_chunks=args.max_chunks,
        max_problem_tokens=args.max_problem_tokens,
        max_memory_tokens=args.max_memory_tokens,
        max_answer_tokens=args.max_answer_tokens,
    )
    sampling = SamplingConfig(
        temperature=args.temperature, top_p=args.top_p, do_sample=args.temperature > 0, seed=args.seed
    )
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    loaded = time.perf_counter()
    agent = MemoryAgent(tokenizer, TransformersGenerator(model, tokenizer, sampling), config)
    trajectory = agent.rollout([context], [args.question], doc_ids=[str(args.context_file)])[0]
    done = time.perf_counter()
    generated = sum(len(call.completion_ids) for call in trajectory.calls)
    print(
        f"[memtrain read] model loaded in {loaded - start:.1f}s; read {trajectory.num_chunks} chunks "
        f"({trajectory.metadata['context_tokens']} tokens, {trajectory.truncated_tokens} centre-truncated) and "
        f"answered in {done - loaded:.1f}s ({len(trajectory.calls)} model calls, {generated} tokens generated)",
        file=sys.stderr,
    )
    _warn_truncation(trajectory, args)
    if args.trace_json:
        save_trajectories([trajectory], args.trace_json)
        print(f"[memtrain read] trajectory JSON: {args.trace_json}", file=sys.stderr)
    if args.trace_html:
        save_trajectory_html(trajectory, args.trace_html)
        print(f"[memtrain read] trajectory HTML: {args.trace_html}", file=sys.stderr)
    print(trajectory.answer)
    return 0


def _warn_truncation(trajectory, args: argparse.Namespace) -> None:
    """Say what the agent did not read: a centre-truncated context or a question cut to its budget."""
    dropped = trajectory.truncated_tokens
    if dropped:
        total = trajectory.metadata["context_tokens"]
        needed = -(-total // args.chunk_size)
        print(
            f"[memtrain read] warning: the context has {total} tokens but --chunk-size {args.chunk_size} x "
            f"--max-chunks {args.max_chunks} reads {total - dropped}; {dropped} tokens from its middle were NOT read "
            f"(pass --max-chunks {needed} to read all of it).",
            file=sys.stderr,
        )
    cut = trajectory.metadata.get("problem_truncated_tokens", 0)
    if cut:
        print(
            f"[memtrain read] warning: the question was cut to --max-problem-tokens {args.max_problem_tokens}: its "
            f"last {cut} tokens were NOT given to the model (pass --max-problem-tokens {args.max_problem_tokens + cut}).",
            file=sys.stderr,
        )


@register_subcommand("eval")
def add_eval(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from memtrain.evaluation.cli import add_eval_arguments, run_eval

    parser = subparsers.add_parser(
        "eval",
        help="Evaluate a model (memory agent and/or full context) on QA rows; write results.json/.md, plot, pages.",
        description="Same arguments as scripts/evaluate.py; see memtrain.evaluation.",
    )
    add_eval_arguments(parser)
    parser.set_defaults(handler=run_eval)
    return parser


# Subcommands that forward their arguments to the entry point of a script (the same flags as the script).
FORWARDED = {
    "train": ("memtrain.train", "MemTrain GRPO from a recipe (= scripts/run_grpo.py recipe.yaml [--key value ...])."),
    "build-data": ("memtrain.data.build", "MemTrain documents from a corpus (= scripts/build_dataset.py)."),
    "build-longqa": ("memtrain.data.longqa", "Long-text QA buckets from HotpotQA rows (= scripts/build_longqa.py)."),
    "build-searchqa": ("memtrain.data.searchqa", "Multi-question search-QA rows (= scripts/build_searchqa.py)."),
    "serve-retriever": ("memtrain.retrieval", "Serve a passage index over HTTP (= scripts/serve_retriever.py)."),
}


def _forward(module_name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        import importlib

        module = importlib.import_module(module_name)
        try:
            module.main(args.forwarded)
        except Exception as error:
            # A push that failed after a complete run (memtrain.train.PushError) is a user-facing error too.
            if type(error).__name__ == "PushError":
                raise CliError(str(error)) from None
            raise
        return 0

    return handler


def _add_forwarded(name: str) -> SubparserAdder:
    module_name, help_text = FORWARDED[name]

    def add(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=help_text, add_help=False)
        parser.add_argument("forwarded", nargs=argparse.REMAINDER, help="Arguments of the script (try --help).")
        parser.set_defaults(handler=_forward(module_name))
        return parser

    return add


for _name in FORWARDED:
    register_subcommand(_name)(_add_forwarded(_name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memtrain", description="MemTrain: train and run memory agents.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        # argparse cannot forward options (e.g. --help) that come first, so forwarded commands bypass it.
        args = argparse.Namespace(command=argv[0], forwarded=argv[1:], handler=_forward(FORWARDED[argv[0]][0]))
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (CliError, ValueError, FileNotFoundError) as error:  # user errors: no traceback
        print(f"memtrain {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
