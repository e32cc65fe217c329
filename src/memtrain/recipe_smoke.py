"""A shipped recipe, shrunk, run with the command its own header documents: one optimizer step, then `memtrain eval`.

A recipe a user cannot launch is a bug whatever the unit tests say, so this runs the user's command on the recipe
file as shipped, with ``--key value`` overrides for what a smoke run must change and nothing else:

* the model: a tiny random model of the recipe's architecture (:mod:`memtrain.tiny_models`);
* the data: a few rows built by the project's own builders (the CPU data recipes, ``build_searchqa.py``), and for a
  retriever service (an http URL) ``scripts/serve_retriever.py`` started on loopback over a small passage file;
* the budgets and batch sizes (:data:`SHRUNK`), ``max_steps: 1`` and the output folder;
* on a machine without a GPU (:data:`CPU_OVERRIDES`): ``use_cpu``, 2 processes for multi-GPU launch configs (gloo),
  and the vLLM settings the CPU backend refuses, each with its reason.

Every override is printed with the command, so a failure reproduces by pasting one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


REPO = Path(__file__).resolve().parents[2]

# Budgets and batch sizes of a smoke run; a key is overridden only where the recipe sets it or a default would be
# large. Two documents of two rollouts per process, two chunks of 64 tokens, 16-token memories and answers.
SHRUNK: dict[str, Any] = {
    "chunk_size": 64,
    "max_chunks": 2,
    "max_problem_tokens": 64,
    "max_memory_tokens": 16,
    "max_answer_tokens": 16,
    "num_generations": 2,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "recall_samples": 2,
    "max_tokens_per_microbatch": 1024,
    "max_steps": 1,
    # A random model scores 0 on every rollout: with the recipe's filter every group would be dropped and the step
    # would run no backward pass at all. Kept, the rows train with advantage 0 (forward, backward, optimizer step).
    "filter_zero_variance_groups": False,
    "logging_steps": 1,
    "save_strategy": "no",
    "trajectory_html_steps": 1,
    "search_max_turns": 2,
    "search_topk": 2,
    "search_observation_tokens": 64,
    "search_max_new_tokens": 24,
}
SHRUNK_ONLY_IF_SET = {"search_max_turns", "search_topk", "search_observation_tokens", "search_max_new_tokens"}
# vLLM engine settings of a smoke run (its longest prompt: template + problem + memory + chunk + reply < 512 tokens).
SHRUNK_VLLM: dict[str, Any] = {"vllm_max_model_length": 1024}
# What a CPU-only machine cannot take as shipped, and why.
CPU_OVERRIDES: dict[str, tuple[Any, str]] = {
    "use_cpu": (True, "no GPU: transformers refuses bf16 without one unless use_cpu is set"),
    "vllm_enable_sleep_mode": (
        False,
        "vLLM's CPU platform refuses sleep mode at engine start ('Sleep mode is not supported on current platform')",
    ),
    "vllm_quantization": (
        "none",
        "vLLM's CPU build has no FP8 kernels: the engine fails at start in _C::static_scaled_fp8_quant (declared "
        "without arguments on CPU)",
    ),
}
# Launch configs written for several GPUs run with this many gloo processes on a CPU.
CPU_PROCESSES = 2
SMOKE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; vLLM's CPU default takes far more
    "PYTHONUNBUFFERED": "1",
}
EVAL_TASK = {"memtrain": "memtrain", "longqa": "longqa", "search": "search"}


class RecipeSmokeError(RuntimeError):
    """A shipped recipe did not run: the command, its exit status and the end of its output."""


def header_commands(recipe: Path) -> list[str]:
    """The shell commands in the recipe's leading comment block (``#   cmd \\`` continuations joined)."""
    commands: list[str] = []
    pending = ""
    for line in recipe.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if pending:
            pending += " " + text
        elif line.startswith("#   ") and text.split(" ", 1)[0] in ("python", "accelerate", "memtrain", "torchrun"):
            pending = text
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        else:
            commands.append(pending.split(" # ")[0].split(" &")[0].strip())
            pending = ""
    return commands


def documented_launch(recipe: Path, repo: Path = REPO) -> list[str]:
    """The command the recipe's header gives for training with it, as argument tokens."""
    relative = recipe.resolve().relative_to(repo.resolve()).as_posix()
    for command in header_commands(recipe):
        tokens = shlex.split(command)
        if relative in tokens and "scripts/run_grpo.py" in tokens:
            return tokens
    raise RecipeSmokeError(
        f"{relative}: its header documents no training command (`accelerate launch ... scripts/run_grpo.py "
        f"{relative}` or `python scripts/run_grpo.py {relative}`); add the command users should run."
    )


def recipe_task(recipe: dict[str, Any]) -> str:
    """``search`` (MEM1 search QA), ``memtrain`` (masked-entity documents) or ``longqa`` (MemAgent QA)."""
    if recipe.get("agent_type") == "search":
        return "search"
    rewards = [str(name) for name in recipe.get("reward_funcs") or ["masked_entity_em"]]
    return "memtrain" if rewards[0].startswith("masked_entity") or "memory_recall" in rewards else "longqa"


@dataclass
class SmokeRun:
    """One shrunk recipe run: what ran, how long, and what it left."""

    recipe: str
    launch: list[str]
    overrides: dict[str, Any]
    seconds: float = 0.0
    global_step: int = 0
    losses: list[float] = field(default_factory=list)
    rows_trained: float = 0.0
    tokens_trained: float = 0.0
    weight_syncs: float | None = None
    distributed: str = ""  # MemTrainer's "launch: N process(es), TYPE (FSDP2) on DEVICE" line
    eval_command: list[str] = field(default_factory=list)
    eval_seconds: float = 0.0
    eval_metrics: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int, log: Path) -> float:
    """Run to completion with output in ``log`` (no pipe a left-behind worker could hold open); raise on failure."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        try:
            done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RecipeSmokeError(f"timed out after {timeout}s: {shlex.join(command)}\n{_tail(log)}") from None
    if done.returncode != 0:
        raise RecipeSmokeError(f"exit {done.returncode}: {shlex.join(command)}\n{_tail(log)}")
    return time.perf_counter() - start


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def smoke_env() -> dict[str, str]:
    env = dict(os.environ, **SMOKE_ENV)
    source = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    return env


def build_tiny_model(folder: Path, architecture: str) -> Path:
    """The tiny model of ``architecture`` with a tokenizer trained on the bundled Wikipedia sample and QA fixtures."""
    from memtrain.data.corpus import builtin_corpus_path, load_corpus
    from memtrain.tiny_models import build_chat_tokenizer, save_tiny_model

    if (folder / "config.json").exists():
        return folder
    corpus = load_corpus(str(builtin_corpus_path("wiki-sample")), limit=400)
    texts = [paragraph["text"] for paragraph in corpus.paragraphs]
    texts += [Path(REPO, "tests/fixtures/search/nq_test_17.jsonl").read_text(encoding="utf-8")]
    tokenizer = build_chat_tokenizer(folder, texts, vocab_size=2000)
    return save_tiny_model(folder, tokenizer, architecture)


# The data each task trains on in a smoke run: the CPU data recipe that builds it (shrunk), or a builder command.
TASK_DATA_RECIPES = {
    "memtrain": "recipes/data/memtrain-wiki-cpu.yaml",
    "longqa": "recipes/data/longqa-hotpotqa-cpu.yaml",
}
SEARCH_DATA_COMMAND = [
    "scripts/build_searchqa.py", "--questions", "tests/fixtures/search/nq_test_17.jsonl",
    "tests/fixtures/longqa/hotpotqa_train_12.json", "--num_rows", "8",
]  # fmt: skip


def build_smoke_dataset(task: str, work: Path) -> Path:
    """A few rows of ``task`` built by the project's own builders (in a child process), once per ``work`` folder."""
    if task in TASK_DATA_RECIPES:
        recipe = REPO / TASK_DATA_RECIPES[task]
        output = work / f"data-recipe-{recipe.stem}"
        if not (output / "data").is_dir():
            run_data_recipe_smoke(recipe, work)
        return output
    if task != "search":
        raise ValueError(f"Unknown smoke task {task!r}; one of memtrain, longqa, search.")
    output = work / "data-search"
    if not (output / "data").is_dir():
        command = [sys.executable, *SEARCH_DATA_COMMAND, "--output_dir", str(output)]
        _run(command, REPO, smoke_env(), 900, work / "build-search.log")
    return output


def training_dataset(task: str, built: Path) -> Path:
    """The folder a recipe's ``dataset_name`` points at for a build (the CPU recipes' layout)."""
    return built / "dataset" if (built / "dataset").exists() else built


@dataclass
class RetrieverService:
    """``scripts/serve_retriever.py`` on loopback, as the search recipes' headers start it."""

    corpus: Path
    process: subprocess.Popen | None = None
    url: str = ""

    def __enter__(self) -> RetrieverService:
        port = free_port()
        command = [sys.executable, "scripts/serve_retriever.py", "--corpus", str(self.corpus), "--port", str(port)]
        self.process = subprocess.Popen(command, cwd=REPO, env=smoke_env(), stdout=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}/retrieve"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RecipeSmokeError(f"the retriever service exited with {self.process.returncode}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return self
            time.sleep(0.5)
        raise RecipeSmokeError("the retriever service did not listen within 120 s")

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


def smoke_overrides(
    recipe: dict[str, Any], model: Path, dataset: Path, output_dir: Path, on_cpu: bool, retriever: str | None = None
) -> dict[str, Any]:
    """The ``--key value`` pairs a smoke run passes after the recipe (everything else is the recipe as shipped)."""
    overrides: dict[str, Any] = {"model_name_or_path": str(model), "dataset_name": str(dataset)}
    overrides["output_dir"] = str(output_dir)
    for key, value in SHRUNK.items():
        if key not in SHRUNK_ONLY_IF_SET or key in recipe:
            overrides[key] = value
    if recipe.get("use_vllm"):
        overrides.update(SHRUNK_VLLM)
    if retriever is not None:
        overrides["retriever"] = retriever
    if on_cpu:
        for key, (value, _reason) in CPU_OVERRIDES.items():
            if key == "use_cpu" or (recipe.get("use_vllm") and key in recipe):
                overrides[key] = value
    return overrides


def launch_command(
    documented: list[str], recipe: Path, overrides: dict[str, Any], on_cpu: bool, python: str = sys.executable
) -> list[str]:
    """The documented command with this interpreter, no more processes than devices, and the overrides appended."""
    command = list(documented)
    if command[0] == "python":
        command[0] = python
    elif command[:2] == ["accelerate", "launch"]:
        command = [python, "-m", "accelerate.commands.launch", *command[2:]]
        config_file = command[command.index("--config_file") + 1] if "--config_file" in command else None
        processes = 1
        if config_file:
            processes = int(yaml.safe_load((REPO / config_file).read_text(encoding="utf-8")).get("num_processes", 1))
        available = CPU_PROCESSES if on_cpu else _gpu_count()
        if processes > min(processes, available):  # a config written for 8 GPUs, on the devices at hand
            index = command.index("scripts/run_grpo.py")
            command[index:index] = ["--num_processes", str(min(processes, available))]
    else:
        raise RecipeSmokeError(f"{recipe}: cannot run the documented command {shlex.join(documented)}")
    for key, value in overrides.items():
        command += [f"--{key}", _cli_value(value)]
    return command


def _gpu_count() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def eval_command(
    recipe: Path, recipe_values: dict[str, Any], trained: Path, dataset: Path, task: str, output_dir: Path,
    on_cpu: bool, retriever: str | None = None, python: str = sys.executable,
) -> list[str]:  # fmt: skip
    """``memtrain eval --config <recipe>`` on the trained model: the recipe's agent settings, shrunk budgets."""
    command = [python, "-m", "memtrain.cli", "eval", "--config", str(recipe), "--model", str(trained)]
    command += ["--dataset", str(dataset), "--task", EVAL_TASK[task], "--output_dir", str(output_dir)]
    command += ["--limit", "2", "--batch_size", "2", "--modes", "agent"]
    if task == "longqa":
        command += ["--dataset_split", f"test_n{DATA_SHRUNK['scripts/build_longqa.py']['test_buckets']}"]
    for key in ("chunk_size", "max_chunks", "max_problem_tokens", "max_memory_tokens", "max_answer_tokens"):
        command += [f"--{key}", str(SHRUNK[key])]
    for key in ("search_max_turns", "search_topk", "search_observation_tokens", "search_max_new_tokens"):
        if key in recipe_values:
            command += [f"--{key}", str(SHRUNK[key])]
    if retriever is not None:
        command += ["--retriever", retriever]
    if recipe_values.get("use_vllm"):
        command += ["--backend", "vllm", "--vllm_max_model_length", str(SHRUNK_VLLM["vllm_max_model_length"])]
    return command


def run_recipe_smoke(
    recipe: Path,
    work: Path,
    on_cpu: bool,
    extra_overrides: dict[str, Any] | None = None,
    timeout: int = 1200,
    evaluate: bool = True,
) -> SmokeRun:
    """Train one step with ``recipe`` through its documented launcher, then evaluate the result; raise on failure."""
    from memtrain.tiny_models import architecture_of

    recipe = recipe.resolve()
    values = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    task = recipe_task(values)
    name = recipe.stem
    model = build_tiny_model(work / f"tiny-{architecture_of(values['model_name_or_path'])}",
                             architecture_of(values["model_name_or_path"]))  # fmt: skip
    built = build_smoke_dataset(task, work)
    run_dir, eval_dir = work / f"run-{name}", work / f"eval-{name}"
    for folder in (run_dir, eval_dir):  # a smoke run's own folders from an earlier smoke run
        shutil.rmtree(folder, ignore_errors=True)
    retriever_url = None
    needs_service = str(values.get("retriever", "")).startswith(("http://", "https://"))
    service = RetrieverService(REPO / "tests/fixtures/search/dpr_passages_200.jsonl") if needs_service else None
    with service or _Nothing() as started:
        if needs_service:
            retriever_url = started.url
        overrides = smoke_overrides(values, model, training_dataset(task, built), run_dir, on_cpu, retriever_url)
        overrides.update(extra_overrides or {})
        command = launch_command(documented_launch(recipe), recipe, overrides, on_cpu)
        smoke = SmokeRun(recipe=recipe.relative_to(REPO).as_posix(), launch=command, overrides=overrides)
        smoke.seconds = round(_run(command, REPO, smoke_env(), timeout, work / f"train-{name}.log"), 1)
        state = json.loads((run_dir / "trainer_state.json").read_text(encoding="utf-8"))
        smoke.global_step = state["global_step"]
        steps = [entry for entry in state["log_history"] if "loss" in entry]
        smoke.losses = [entry["loss"] for entry in steps]
        smoke.rows_trained = sum(entry.get("rows_trained", 0.0) for entry in steps)
        smoke.tokens_trained = sum(entry.get("tokens_trained", 0.0) for entry in steps)
        smoke.weight_syncs = steps[-1].get("vllm/weight_syncs") if steps else None
        launches = re.findall(r"launch: (.+)", (work / f"train-{name}.log").read_text(encoding="utf-8"))
        smoke.distributed = launches[0].strip() if launches else ""
        if smoke.global_step != 1 or smoke.rows_trained <= 0:
            raise RecipeSmokeError(
                f"{smoke.recipe}: the run ended at step {smoke.global_step} having trained {smoke.rows_trained} "
                f"rows; one optimizer step over trained rows was expected (log: {work / f'train-{name}.log'})."
            )
        if not evaluate:
            return smoke
        use_vllm = bool(overrides.get("use_vllm", values.get("use_vllm")))
        evaluated = {**values, "use_vllm": use_vllm}
        smoke.eval_command = eval_command(recipe, evaluated, run_dir, built, task, eval_dir, on_cpu, retriever_url)
        smoke.eval_seconds = round(_run(smoke.eval_command, REPO, smoke_env(), timeout, work / f"eval-{name}.log"), 1)
        smoke.eval_metrics = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))
    return smoke


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# Data recipes (recipes/data/): small counts, and local stand-ins for what a recipe reads from the Hub (applied only
# where the recipe names a Hub id): the bundled Wikipedia sample, the offline MiniLM embedder, the packaged SmolLM2
# tokenizer, the QA fixtures and a tiny closed-book filter model.
DATA_SHRUNK: dict[str, dict[str, Any]] = {
    "scripts/build_dataset.py": {
        "num_documents": 4, "num_neighbours": 2, "num_random": 2, "corpus_limit": 600, "min_tokens": 200,
        "max_tokens": 3000,
    },
    "scripts/build_longqa.py": {
        "train_num_docs": 24, "test_buckets": 24, "num_test_questions": 2, "max_train_questions": 4,
    },
}  # fmt: skip
DATA_LOCAL: dict[str, Any] = {
    "corpus": "builtin:wiki-sample",
    "streaming": False,
    "embedding_model": "minilm",
    "tokenizer_name_or_path": "smollm2-135m",
    "train_source": "tests/fixtures/longqa/hotpotqa_train_12.json",
    "test_source": "tests/fixtures/longqa/musique_train_3.json",
    "filter_model": "<tiny>",  # the tiny model of the filter's architecture
}


def _is_hub_reference(value: Any, repo: Path = REPO) -> bool:
    """A Hub id (``org/name``), not a local path, packaged name or builtin corpus."""
    text = str(value)
    return "/" in text and not text.startswith(("builtin:", ".", "/", "~")) and not (repo / text).exists()


@dataclass
class DataSmokeRun:
    """One shrunk data-recipe build: what ran, how long, and the rows of each split it wrote."""

    recipe: str
    command: list[str]
    overrides: dict[str, Any]
    seconds: float = 0.0
    splits: dict[str, int] = field(default_factory=dict)


def run_data_recipe_smoke(recipe: Path, work: Path, timeout: int = 900) -> DataSmokeRun:
    """Build with a data recipe through the command its header documents, shrunk; raise on failure."""
    from memtrain.tiny_models import architecture_of

    recipe = recipe.resolve()
    relative = recipe.relative_to(REPO).as_posix()
    values = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    documented = next((shlex.split(c) for c in header_commands(recipe) if relative in shlex.split(c)), None)
    if documented is None or documented[0] != "python" or documented[1] not in DATA_SHRUNK:
        raise RecipeSmokeError(f"{relative}: its header documents no build command (python scripts/build_*.py).")
    overrides: dict[str, Any] = dict(DATA_SHRUNK[documented[1]])
    for key, local in DATA_LOCAL.items():
        if key in values and (_is_hub_reference(values[key]) or (key == "streaming" and values[key])):
            if local == "<tiny>":
                architecture = architecture_of(str(values[key]))
                local = build_tiny_model(work / f"tiny-{architecture}", architecture)
            overrides[key] = local
    output = work / f"data-recipe-{recipe.stem}"
    shutil.rmtree(output, ignore_errors=True)
    overrides["output_dir"] = output
    command = [sys.executable, *documented[1:]]
    command = command[: command.index(relative) + 1]  # the documented extra flags (e.g. a push) are not run
    for key, value in overrides.items():
        command += [f"--{key}", _cli_value(value)]
    smoke = DataSmokeRun(recipe=relative, command=command, overrides={k: str(v) for k, v in overrides.items()})
    smoke.seconds = round(_run(command, REPO, smoke_env(), timeout, work / f"build-{recipe.stem}.log"), 1)
    import pyarrow.parquet as pq

    for file in sorted((output / "data").glob("*.parquet")):
        split = file.stem.split("-")[0]
        smoke.splits[split] = smoke.splits.get(split, 0) + pq.read_metadata(file).num_rows
    if not smoke.splits or not all(smoke.splits.values()) or not (output / "README.md").is_file():
        raise RecipeSmokeError(f"{relative}: the build wrote {smoke.splits} and no card; see {work}/build-*.log")
    return smoke


def data_recipes(repo: Path = REPO) -> list[Path]:
    """Every dataset-building recipe shipped in ``recipes/data/``."""
    return sorted(repo.glob("recipes/data/*.yaml"))


def shipped_recipes(repo: Path = REPO) -> list[Path]:
    """Every training recipe shipped in ``recipes/`` and ``recipes/post_training/``."""
    return sorted([*repo.glob("recipes/*.yaml"), *repo.glob("recipes/post_training/*.yaml")])


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path, help="recipe files (default with --all: every one)")
    parser.add_argument("--all", action="store_true", help="every recipe in recipes/, data/ and post_training/")
    parser.add_argument("--no_vllm", action="store_true", help="generate with transformers (use_vllm false)")
    parser.add_argument("--work_dir", type=Path, default=None, help="keep models, data, runs and logs here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one more override")
    parser.add_argument("--no_eval", action="store_true", help="train only (no `memtrain eval` afterwards)")
    args = parser.parse_args(argv)
    recipes = [*data_recipes(), *shipped_recipes()] if args.all else args.recipes
    if not recipes:
        parser.error("name recipe files or pass --all")
    on_cpu = not torch.cuda.is_available()
    extra: dict[str, Any] = {"use_vllm": False} if args.no_vllm else {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--set {pair}: expected KEY=VALUE, e.g. --set reward_funcs=masked_entity_em")
        extra[key] = value
    failed = 0
    with tempfile.TemporaryDirectory(prefix="memtrain-recipe-smoke-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for recipe in recipes:
            try:
                if recipe.resolve().parent == (REPO / "recipes" / "data").resolve():
                    summary = {"status": "ok", **dataclasses.asdict(run_data_recipe_smoke(recipe, work))}
                else:
                    run = run_recipe_smoke(recipe, work, on_cpu, extra, evaluate=not args.no_eval)
                    summary = {"status": "ok", **dataclasses.asdict(run)}
            except RecipeSmokeError as error:
                failed += 1
                summary = {"recipe": str(recipe), "status": "failed", "error": str(error)}
            print(json.dumps(summary, default=str), flush=True)
    return 1 if failed else 0
