"""The dataclasses a recipe is parsed into, and the recipe parser that refuses unknown keys before any model loads.

A recipe is one YAML file whose keys belong to exactly one of: :class:`MemTrainScriptArguments` (data),
:class:`~memtrain.agent.memory_agent.AgentConfig` (the memory agent), :class:`MemTrainConfig` (GRPO + MemTrain
knobs, a ``trl.GRPOConfig``) and ``trl.ModelConfig`` (model loading, LoRA / QLoRA).

The agents' settings are declared once: the memory agent's in ``AgentConfig``, the search agent's in
:class:`SearchAgentArguments` (a base of ``MemTrainConfig``). ``memtrain eval`` and ``memtrain read`` parse the same
dataclasses with :func:`parse_settings`, so ``memtrain eval --config recipes/x.yaml`` reads a model with exactly the
chunking, budgets and templates it was trained with.

Settings sit below what they configure: the agents, the retriever, the trainer and the evaluation import this module,
never the other way round (it builds none of them; tests/test_package_layout.py keeps the import graph free of circles).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml
from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser

from memtrain.agent.memory_agent import AgentConfig
from memtrain.grpo import LOSS_AGGREGATIONS
from memtrain.metrics import RECALL_METRICS


RECALL_LAMBDA = 0.5  # the paper's weight of the recall reward in R_i (PAPER.md section 4)


@dataclass
class MemTrainScriptArguments(ScriptArguments):
    """Where the training documents come from.

    ``dataset_name`` is a Hub dataset id, a folder written by ``save_to_disk`` / ``scripts/build_dataset.py``, or a
    local parquet / jsonl / json file. Rows follow the dataset contract: ``prompt``, ``context``, ``answers``.
    """

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, a `save_to_disk` folder, or a parquet/jsonl/json file."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training documents (quick runs)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation rows."})


@dataclass
class SearchAgentArguments:
    """MEM1's search agent (PAPER.md section 6): the recipe keys of training and the flags of ``memtrain eval``.

    Plain settings, below what they configure: :meth:`memtrain.agent.search_agent.SearchAgentConfig.from_arguments`
    turns them into the agent's settings and :func:`memtrain.retrieval.build_retriever` into its retriever.
    """

    retriever: str | None = field(
        default=None,
        metadata={
            "help": "Search agent only: a passage corpus (file, folder, Hub id, `builtin:wiki-sample`) indexed in "
            "process, or the http URL of `scripts/serve_retriever.py` shared by all processes."
        },
    )
    retriever_method: str = field(default="bm25", metadata={"help": "In-process retriever: `bm25` or `dense`."})
    search_max_turns: int = field(
        default=6, metadata={"help": "Search agent: turns before a forced answer (MEM1: 6)."}
    )
    search_topk: int = field(default=3, metadata={"help": "Search agent: passages per search (MEM1: 3)."})
    search_observation_tokens: int = field(
        default=1024, metadata={"help": "Search agent: token budget of one <information> block (MEM1: 1k)."}
    )
    search_max_new_tokens: int = field(default=512, metadata={"help": "Search agent: new tokens per turn."})


AGENT_DATACLASSES = (AgentConfig, SearchAgentArguments)


@dataclass
class MemTrainConfig(GRPOConfig, SearchAgentArguments):
    """``trl.GRPOConfig`` plus what multi-conversation GRPO over a memory agent needs (PAPER.md sections 3-5).

    ``num_generations`` is G1, the rollouts per document; ``per_device_train_batch_size`` counts rollouts (as TRL
    counts completions), so a step trains ``per_device_train_batch_size / num_generations`` documents per device.

    The defaults are the paper's objective (PAPER.md section 5), so a recipe that omits a key still trains MemTrain:
    R_i = EM_i + 0.5 x mean recall EM (``reward_weights`` None gives ``memory_recall`` lambda = 0.5 and every other
    reward 1.0), mean-centred advantages without the std (``scale_rewards: none``), DAPO filtering, PPO clip
    0.2/0.2, KL coefficient 1e-3, lr 1e-6 with 20 warm-up steps then constant, weight decay 0.01, grad clip 1.0,
    temperature 1.0, top_p 1.0, G1 = G2 = 8, and the loss averaged per model call (``conversation_mean``).
    """

    # TRL's defaults overridden by the paper's.
    beta: float = field(default=1e-3, metadata={"help": "KL coefficient (k3 estimator, as a loss term); paper 1e-3."})
    scale_rewards: str = field(
        default="none",
        metadata={"help": "`none` (paper, Dr. GRPO: advantages mean-centred only), `group` or `batch` std scaling."},
    )
    lr_scheduler_type: str = field(
        default="constant_with_warmup", metadata={"help": "Paper: `warmup_steps` of linear warm-up, then constant."}
    )
    warmup_steps: float = field(default=20, metadata={"help": "Linear warm-up steps; paper 20."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay; paper 0.01."})
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Dropout off in the policy, LoRA's lora_dropout included (TRL's default: on). Every row is the "
            "sampler's own tokens, scored against old log-probs and vLLM's sampling log-probs (importance "
            "sampling) that came from the model without dropout; a noised training forward would bias the ratio."
        },
    )

    reward_funcs: list[str] = field(
        default_factory=lambda: ["masked_entity_em", "memory_recall"],
        metadata={"help": "Reward functions by registry name (memtrain.rewards); weights in `reward_weights`."},
    )
    lenient_recall: bool = field(
        default=False,
        metadata={
            "help": "Score recall answers leniently (small models rarely write \\boxed{}); pair it with a `_lenient` "
            "final-answer reward. A small-model setting, not the paper's strict boxed exact match."
        },
    )
    recall_metric: str = field(
        default="exact",
        metadata={
            "help": "How a recall answer is scored: `exact` (the paper's masked-entity exact match) or `f1` (SQuAD "
            "token F1: partial credit for an answer that contains the entity; a small-model shaping reward)."
        },
    )
    recall_samples: int = field(
        default=8, metadata={"help": "G2: answers sampled for each rollout's intermediate-memory recall probe."}
    )
    recall_chunk_policy: str = field(
        default="any",
        metadata={
            "help": "Which read chunk the recall probe masks: `any` (uniform over the chunks the memory has read, the "
            "paper) or `latest` (the chunk read last: easier, for small models)."
        },
    )
    train_recall_answers: bool = field(
        default=True,
        metadata={"help": "Train on the recall answers (their own G2 groups). Off: recall only feeds the reward."},
    )
    warm_start_examples: int = field(
        default=0,
        metadata={
            "help": "Small models: before GRPO, fine-tune on this many self-supervised recall and memory-update turns "
            "(memtrain.warm_start) so recall rewards are not all zero. 0 (the paper): no warm start."
        },
    )
    warm_start_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the warm start."})
    warm_start_epochs: int = field(default=1, metadata={"help": "Passes over the warm-start examples."})
    agent_type: str = field(
        default="memory",
        metadata={
            "help": "`memory`: MemAgent's chunked reading (MemTrain, long-text QA). `search`: MEM1's search agent "
            "(search QA; needs `retriever`)."
        },
    )
    filter_zero_variance_groups: bool = field(
        default=True, metadata={"help": "Drop groups whose rewards are all equal (DAPO dynamic filtering)."}
    )
    loss_aggregation: str = field(
        default="conversation_mean",
        metadata={
            "help": "`conversation_mean` (the paper's equation): each model call (memory update, final answer, recall "
            "answer) is a conversation; average its tokens, then over all calls of the step. `token_mean` (the "
            "reference code): every generated token of the step weighs the same. `rollout_mean`: average over a "
            "whole rollout's calls first, then over rollouts and recall answers."
        },
    )
    max_tokens_per_microbatch: int = field(
        default=16384,
        metadata={
            "help": "Token budget (sequences x padded length) of one forward/backward micro-batch; with "
            "share_prompts, a group of rows with one prompt is one sequence holding the prompt once."
        },
    )
    share_prompts: bool = field(
        default=True,
        metadata={
            "help": "Score rows that share their exact prompt (a probe's G2 recall answers, a document's first "
            "memory updates) in one sequence that encodes the prompt once: same log-probs and gradients, fewer "
            "tokens. Needs sdpa or eager attention; other implementations score rows one by one (logged)."
        },
    )
    vllm_lora_sync: bool = field(
        default=False,
        metadata={
            "help": "LoRA/QLoRA with vLLM: the engine loads the base once with LoRA enabled and each optimizer step "
            "writes only the adapter (a RAM-backed folder) for it to serve; the base is never pushed again and sleep "
            "keeps it (level 1). Server mode: the server must run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and "
            "--enable-lora on the same machine. For cards without room for a dense bf16 copy; vLLM serves a LoRA at "
            "~1.35x the time per token of merged weights. Off: the merged weights are pushed every step."
        },
    )
    vllm_quantization: str | None = field(
        default=None,
        metadata={
            "help": "With vllm_lora_sync: `fp8` serves the base quantized online to FP8 (GPUs with FP8: Ada, Hopper; "
            "half the bytes of bf16). None: the compute dtype."
        },
    )
    vllm_max_num_seqs: int | None = field(
        default=None,
        metadata={
            "help": "Colocated vLLM: sequences the engine runs at once. Set it to what its KV cache holds (KV tokens / "
            "longest call) so requests wait instead of being preempted and recomputed. None: TRL's "
            "per_device_train_batch_size x tensor-parallel size x steps_per_generation."
        },
    )
    trajectory_html_steps: int = field(
        default=50, metadata={"help": "Write a trajectory HTML page every N optimizer steps (0: never)."}
    )
    trajectory_html_max: int = field(default=4, metadata={"help": "Rollouts shown on each trajectory page."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an output_dir that holds another run: its files are deleted first (transformers 5 "
            "dropped this flag; without it such a folder is refused)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.vllm_quantization).lower() in {"none", "null", ""}:
            self.vllm_quantization = None  # `--vllm_quantization none` on the command line: the compute dtype
        if self.vllm_max_num_seqs is not None and self.vllm_max_num_seqs < 1:
            raise ValueError(f"vllm_max_num_seqs must be >= 1 (or null for TRL's), got {self.vllm_max_num_seqs}.")
        if self.agent_type not in {"memory", "search"}:
            raise ValueError(f"agent_type must be `memory` or `search`, got {self.agent_type!r}.")
        if self.agent_type == "search" and not self.retriever:
            raise ValueError("agent_type `search` needs `retriever:` (a passage corpus or a retriever service URL).")
        if self.recall_chunk_policy not in {"any", "latest"}:
            raise ValueError(f"recall_chunk_policy must be `any` or `latest`, got {self.recall_chunk_policy!r}.")
        if self.recall_metric not in RECALL_METRICS:
            raise ValueError(f"recall_metric must be one of {', '.join(RECALL_METRICS)}, got {self.recall_metric!r}.")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(
                f"loss_aggregation must be one of {', '.join(LOSS_AGGREGATIONS)}, got {self.loss_aggregation!r}."
            )
        if self.reward_weights is None:
            # The paper's coupling R_i = EM_i + lambda x recall, lambda = 0.5; TRL's None would mean lambda = 1.
            self.reward_weights = [RECALL_LAMBDA if name == "memory_recall" else 1.0 for name in self.reward_funcs]
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values but reward_funcs names "
                f"{len(self.reward_funcs)} functions ({self.reward_funcs}); give one weight per function."
            )
        if self.warm_start_examples < 0 or self.warm_start_epochs < 1 or self.warm_start_learning_rate <= 0:
            raise ValueError(
                "Need warm_start_examples >= 0, warm_start_epochs >= 1 and warm_start_learning_rate > 0, got "
                f"{self.warm_start_examples}, {self.warm_start_epochs}, {self.warm_start_learning_rate}."
            )
        if self.warm_start_examples and self.agent_type != "memory":
            raise ValueError("warm_start_examples applies to the memory agent (agent_type: memory) only.")
        if self.max_tokens_per_microbatch < 1:
            raise ValueError("max_tokens_per_microbatch must be positive.")


RECIPE_DATACLASSES = (MemTrainScriptArguments, AgentConfig, MemTrainConfig, ModelConfig)


class RecipeError(ValueError):
    """A recipe names a key no dataclass knows, or is not a YAML mapping."""


def known_recipe_keys(dataclass_types: Sequence[type] = RECIPE_DATACLASSES) -> set[str]:
    return {f.name for cls in dataclass_types for f in dataclasses.fields(cls)} | {"env"}


def _read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"Recipe {path} does not exist. Recipes live under recipes/ (e.g. recipes/smollm2-135m.yaml)."
        )
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"Recipe {path} is not valid YAML: {err}") from err
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe {path} must be a YAML mapping of `key: value` lines.")
    return recipe


class RecipeParser(TrlParser):
    """TRL's parser whose errors are one :class:`RecipeError` line naming the file and key, not a usage dump.

    argparse answers a bad value (``chunk_size: abc``) with the whole usage (40+ lines for a recipe's keys) and an
    ``argument --chunk_size/--chunk-size`` line that does not say it came from a file. ``source`` is the settings file
    whose values the parser holds as defaults, ``file_keys`` the keys it set.
    """

    def __init__(self, *args: Any, source: str | None = None, file_keys: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source, self.file_keys = source, set(file_keys)

    def error(self, message: str) -> NoReturn:
        match = re.match(r"argument --([\w-]+)(?:/--[\w-]+)?: (.*)", message)
        if match is None:
            raise RecipeError(f"{message}; `--help` lists every key.")
        key, problem = match.group(1).replace("-", "_"), match.group(2)
        where = f"{self.source}: `{key}`" if self.source and key in self.file_keys else f"--{key}"
        raise RecipeError(f"{where}: {problem}; fix the value (`--help` gives each key's type and default).")


def load_recipe(path: str | Path, dataclass_types: Sequence[type] = RECIPE_DATACLASSES) -> dict[str, Any]:
    """Read a recipe and check every key before anything heavy happens."""
    recipe = _read_yaml_mapping(path)
    check_recipe_keys(recipe, source=str(path), dataclass_types=dataclass_types)
    return recipe


def check_recipe_keys(
    recipe: dict[str, Any], source: str = "the recipe", dataclass_types: Sequence[type] = RECIPE_DATACLASSES
) -> None:
    known = known_recipe_keys(dataclass_types)
    unknown = [key for key in recipe if key not in known]
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            lines.append(f"  - {key}{hint}")
        raise RecipeError(
            f"Unknown key(s) in {source}:\n" + "\n".join(lines) + "\nFix the spelling or remove the key; the valid "
            "keys are the fields of " + ", ".join(cls.__name__ for cls in dataclass_types) + "."
        )


def _check_cli_options(argv: list[str], dataclass_types: Sequence[type]) -> None:
    known = known_recipe_keys(dataclass_types)
    for arg in argv:
        if arg.startswith("--") and arg != "--config":
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            if key not in known and not key.startswith("no_"):
                close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
                hint = f" (did you mean --{', --'.join(close)}?)" if close else ""
                raise RecipeError(f"Unknown command-line option --{key}{hint}.")


def parse_recipe_args(
    argv: list[str] | None = None, dataclass_types: Sequence[type] = RECIPE_DATACLASSES
) -> tuple[Any, ...]:
    """Parse ``recipe.yaml [--key value ...]`` (or ``--config recipe.yaml``) into the recipe dataclasses.

    Command-line ``--key value`` pairs override the recipe. Unknown keys, in the file or on the command line, raise
    :class:`RecipeError` naming the key before any model is loaded.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        # Every key of every dataclass with its help and default (argparse prints them and exits 0).
        TrlParser(tuple(dataclass_types)).parse_args(["--help"])
    if argv and not argv[0].startswith("-"):
        argv = ["--config", argv[0], *argv[1:]]
    source, file_keys = None, []
    if "--config" in argv:
        source = argv[argv.index("--config") + 1]
        file_keys = list(load_recipe(source, dataclass_types))
    _check_cli_options(argv, dataclass_types)
    parser = RecipeParser(tuple(dataclass_types), source=source, file_keys=file_keys)
    return parser.parse_args_and_config(argv)


# The recipe key naming the model; `memtrain eval` / `read` call it `model`.
RECIPE_MODEL_KEY = "model_name_or_path"


def settings_from_file(path: str | Path, dataclass_types: Sequence[type]) -> dict[str, Any]:
    """The values a settings file gives a command parsed into ``dataclass_types`` (e.g. ``memtrain eval``).

    The file is either the command's own settings (every key one of its fields) or a training recipe. From a recipe
    the command takes the agents' settings (``AgentConfig``, ``SearchAgentArguments``: chunking, budgets, templates,
    retriever), the model (``model_name_or_path`` as ``model``) and its own keys that training does not have;
    training's other keys are training's (its ``output_dir``, sampling ``temperature``, ``seed``, G2
    ``recall_samples``...) and are ignored even where the command has a key of that name. A key that neither the
    command nor training knows is refused, naming the key.
    """
    values = _read_yaml_mapping(path)
    env = values.pop("env", None) or {}
    if not isinstance(env, dict):
        raise RecipeError(f"{path}: `env` must be a mapping of environment variables.")
    check_recipe_keys(values, source=str(path), dataclass_types=(*dataclass_types, *RECIPE_DATACLASSES))
    own = known_recipe_keys(dataclass_types) - {"env"}
    training = known_recipe_keys(RECIPE_DATACLASSES) - {"env"}
    if not any(key in training and key not in own for key in values):
        taken = dict(values)
    else:
        agent = known_recipe_keys(AGENT_DATACLASSES) & own
        taken = {key: value for key, value in values.items() if key in agent or key not in training}
        if RECIPE_MODEL_KEY in values and "model" in own:
            taken["model"] = values[RECIPE_MODEL_KEY]
    for key, value in env.items():
        os.environ[key] = str(value)
    return taken


def parse_settings(argv: Sequence[str] | None, dataclass_types: Sequence[type], prog: str) -> tuple[Any, ...]:
    """Parse ``[--config FILE] [--key value ...]`` into ``dataclass_types``: the parser of ``memtrain eval`` / ``read``.

    The sibling of :func:`parse_recipe_args` for commands that run a trained agent: ``--config`` (or a first
    positional path) is the command's own YAML or a training recipe (:func:`settings_from_file`); command-line
    values override it; ``-h`` lists every key with its help and default. Unknown keys raise :class:`RecipeError`
    naming the key before anything loads.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        f"{prog} [--config FILE] [--key value ...]: FILE is a YAML of these keys or a training recipe (recipes/*.yaml, "
        "whose agent settings and model are used); --key value overrides it."
    )
    parser = RecipeParser(tuple(dataclass_types), prog=prog, description=usage)
    if "-h" in argv or "--help" in argv:
        parser.parse_args(["--help"])
    if argv and not argv[0].startswith("-"):
        argv = ["--config", *argv]
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise RecipeError("--config needs a path: a settings YAML or a training recipe (recipes/*.yaml).")
        path = argv[index + 1]
        argv = argv[:index] + argv[index + 2 :]
        values = settings_from_file(path, dataclass_types)
        parser.source, parser.file_keys = path, set(values)
        parser.set_defaults_with_config(**values)
    _check_cli_options(argv, dataclass_types)
    return tuple(parser.parse_args_into_dataclasses(args=argv))
