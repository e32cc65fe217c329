"""The ``memtrain`` command line: one entry point whose subcommands register themselves in ``SUBCOMMANDS``.

A new subcommand is a function that adds its subparser and sets ``handler`` (a function of the parsed args that
returns an exit code); decorate it with :func:`register_subcommand` and ``memtrain <name>`` exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class ReadArguments:
    """`memtrain read`: what to read and ask; the memory agent's settings are ``AgentConfig``'s (as in a recipe)."""

    model: str | None = field(
        default=None,
        metadata={"help": "Packaged name (smollm2-135m), local folder, .gguf or Hub id; from a recipe: its model."},
    )
    context_file: str | None = field(default=None, metadata={"help": "UTF-8 text file to read ('-' reads stdin)."})
    question: str | None = field(default=None, metadata={"help": "The question (the agent's problem)."})
    temperature: float = field(default=0.0, metadata={"help": "0 decodes greedily; > 0 samples (see --seed)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass when sampling."})
    seed: int = field(default=0, metadata={"help": "Sampling seed: the same seed gives the same run."})
    trace_json: str | None = field(default=None, metadata={"help": "Save the trajectory (every model call) as JSON."})
    trace_html: str | None = field(default=None, metadata={"help": "Save the trajectory viewer (HTML) here."})
    backend: str = field(
        default="transformers",
        metadata={"help": "`transformers` (generate) or `vllm` (an in-process vllm.LLM; needs vLLM and a GPU)."},
    )
    base_url: str | None = field(
        default=None, metadata={"help": "Read with a model served by an OpenAI-compatible server at this URL."}
    )
    served_model_name: str | None = field(default=None, metadata={"help": "Model name sent to --base_url."})
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vllm backend: GPU memory share."})
    vllm_max_model_length: int | None = field(default=None, metadata={"help": "vllm backend: engine context length."})


def _read_context(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    file = Path(path)
    if not file.is_file():
        raise CliError(f"--context_file {path}: no such file; pass a UTF-8 text file (or '-' for stdin).")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CliError(f"--context_file {path}: not UTF-8 text ({error}); convert it to UTF-8 first.") from None


def run_read(argv: list[str]) -> int:
    """`memtrain read [--config FILE] [--key value ...]`: one rollout of the memory agent; prints the answer."""
    from memtrain.agent.memory_agent import AgentConfig
    from memtrain.configs import parse_settings

    # Check the user's input before the heavy imports and the model load, so a typo fails in milliseconds.
    args, config = parse_settings(argv, (ReadArguments, AgentConfig), "memtrain read")
    for name in ("model", "context_file", "question"):
        if getattr(args, name) is None:
            raise CliError(f"--{name} is required (memtrain read --help lists every key).")
    if args.temperature < 0:
        raise CliError(f"--temperature must be >= 0, got {args.temperature}.")
    if not 0 < args.top_p <= 1:
        raise CliError(f"--top_p must be in (0, 1], got {args.top_p}.")
    if args.base_url and args.backend != "transformers":
        raise CliError("--base_url reads with a served model; drop --backend (it picks an in-process engine).")
    from memtrain.evaluation.backend import load_generator, require_backend

    require_backend(args.backend)
    context = _read_context(args.context_file)
    if not context.strip():
        raise CliError(f"--context_file {args.context_file} is empty: there is nothing to read; pass the long text.")
    if not args.question.strip():
        raise CliError("--question is empty; ask the question the memory agent should answer.")

    from memtrain.agent.generation import SamplingConfig
    from memtrain.agent.memory_agent import MemoryAgent
    from memtrain.agent.trajectory import save_trajectories
    from memtrain.viz import save_trajectory_html

    sampling = SamplingConfig(
        temperature=args.temperature, top_p=args.top_p, do_sample=args.temperature > 0, seed=args.seed
    )
    start = time.perf_counter()
    tokenizer, generator = load_generator(
        args.model,
        args.backend,
        base_url=args.base_url,
        served_model_name=args.served_model_name,
        sampling=sampling,
        seed=args.seed,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        vllm_max_model_length=args.vllm_max_model_length,
    )
    loaded = time.perf_counter()
    agent = MemoryAgent(tokenizer, generator, config)

    def progress(step: int, steps: int) -> None:  # a long text reads for minutes: say how far it is
        what = f"chunk {step}/{steps - 1} read" if step < steps else "answered"
        print(f"[memtrain read] {what} ({time.perf_counter() - loaded:.1f}s)", file=sys.stderr, flush=True)

    trajectory = agent.rollout(
        [context], [args.question], doc_ids=[str(args.context_file)], sampling=sampling, on_step=progress
    )[0]
    done = time.perf_counter()
    generated = sum(len(call.completion_ids) for call in trajectory.calls)
    print(
        f"[memtrain read] model loaded in {loaded - start:.1f}s; read {trajectory.num_chunks} chunks "
        f"({trajectory.metadata['context_tokens']} tokens, {trajectory.truncated_tokens} centre-truncated) and "
        f"answered in {done - loaded:.1f}s ({len(trajectory.calls)} model calls, {generated} tokens generated)",
        file=sys.stderr,
    )
    _warn_truncation(trajectory, config)
    if args.trace_json:
        save_trajectories([trajectory], args.trace_json)
        print(f"[memtrain read] trajectory JSON: {args.trace_json}", file=sys.stderr)
    if args.trace_html:
        save_trajectory_html(trajectory, args.trace_html)
        print(f"[memtrain read] trajectory HTML: {args.trace_html}", file=sys.stderr)
    print(trajectory.answer)
    return 0


def _warn_truncation(trajectory, config) -> None:
    """Say what the agent did not read: a centre-truncated context or a question cut to its budget."""
    dropped = trajectory.truncated_tokens
    if dropped:
        total = trajectory.metadata["context_tokens"]
        needed = -(-total // config.chunk_size)
        print(
            f"[memtrain read] warning: the context has {total} tokens but --chunk_size {config.chunk_size} x "
            f"--max_chunks {config.max_chunks} reads {total - dropped}; {dropped} tokens from its middle were NOT "
            f"read (pass --max_chunks {needed} to read all of it).",
            file=sys.stderr,
        )
    cut = trajectory.metadata.get("problem_truncated_tokens", 0)
    if cut:
        budget = config.max_problem_tokens
        print(
            f"[memtrain read] warning: the question was cut to --max_problem_tokens {budget}: its last {cut} tokens "
            f"were NOT given to the model (pass --max_problem_tokens {budget + cut}).",
            file=sys.stderr,
        )


# Subcommands that forward their arguments to the entry point of a script (the same flags as the script).
# ``module:function`` taking the argument list; each parses it with TRL's parser ([--config FILE] [--key value]).
FORWARDED = {
    "read": (
        "memtrain.cli:run_read",
        "Read a long text chunk by chunk into a bounded memory, then answer a question from the memory.",
    ),
    "eval": (
        "memtrain.evaluation.cli:run_eval",
        "Evaluate a model (memory agent and/or full context) on QA rows; write results.json/.md, plot, pages "
        "(= scripts/evaluate.py).",
    ),
    "train": (
        "memtrain.train:main",
        "MemTrain GRPO from a recipe (= scripts/run_grpo.py recipe.yaml [--key value ...]).",
    ),
    "build-data": ("memtrain.data.build:main", "MemTrain documents from a corpus (= scripts/build_dataset.py)."),
    "build-longqa": (
        "memtrain.data.longqa:main",
        "Long-text QA buckets from HotpotQA rows (= scripts/build_longqa.py).",
    ),
    "build-searchqa": ("memtrain.data.searchqa:main", "Multi-question search-QA rows (= scripts/build_searchqa.py)."),
    "serve-retriever": ("memtrain.retrieval:main", "Serve a passage index over HTTP (= scripts/serve_retriever.py)."),
}


def _forward(target: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        import importlib

        module_name, function = target.split(":")
        entry = getattr(importlib.import_module(module_name), function)
        # The entry points parse with argparse, whose usage line is named after sys.argv[0]: `memtrain train --help`
        # must say `usage: memtrain train ...`, not `usage: memtrain ...`.
        program, sys.argv[0] = sys.argv[0], getattr(args, "prog", None) or f"memtrain {args.command}"
        try:
            result = entry(args.forwarded)
            # read/eval return an exit code; the scripts' mains may return what they wrote (a path), meaning success
            return result if isinstance(result, int) and not isinstance(result, bool) else 0
        except Exception as error:
            # A push that failed after a complete run (memtrain.train.PushError) is a user-facing error too.
            if type(error).__name__ == "PushError":
                raise CliError(str(error)) from None
            raise
        finally:
            sys.argv[0] = program

    return handler


def _add_forwarded(name: str) -> SubparserAdder:
    module_name, help_text = FORWARDED[name]

    def add(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=help_text, add_help=False)
        parser.add_argument("forwarded", nargs=argparse.REMAINDER, help="Its arguments (try --help).")
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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``memtrain COMMAND ...``; ``prog`` names a script that is a forwarded command (its usage and error lines)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        # argparse cannot forward options (e.g. --help) that come first, so forwarded commands bypass it.
        args = argparse.Namespace(command=argv[0], forwarded=argv[1:], handler=_forward(FORWARDED[argv[0]][0]))
        args.prog = prog
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (CliError, ValueError, FileNotFoundError) as error:  # user errors: no traceback
        print(f"{prog or f'memtrain {args.command}'}: error: {error}", file=sys.stderr)
        return 2


def run_script(command: str) -> int:
    """The entry point of a script that is a forwarded command (``scripts/build_dataset.py`` = ``memtrain
    build-data``): the same one-line user errors and exit code 2, named after the script."""
    return main([command, *sys.argv[1:]], prog=Path(sys.argv[0]).name)


if __name__ == "__main__":
    sys.exit(main())
