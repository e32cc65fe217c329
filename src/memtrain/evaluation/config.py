"""The settings of `memtrain eval`: what decides a result (:class:`EvalConfig`, recorded with every run in
results.json) and how to get the model and the rows (:class:`EvalArguments`).

The memory agent's and the search agent's settings are not re-declared here: ``EvalConfig`` is an
:class:`~memtrain.agent.memory_agent.AgentConfig` and a :class:`~memtrain.configs.SearchAgentArguments`, the
dataclasses a training recipe is parsed into, so ``memtrain eval --config recipes/x.yaml`` evaluates with the
recipe's chunk size, every token budget (``max_problem_tokens`` included), templates and retriever.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from memtrain.agent.memory_agent import AgentConfig
from memtrain.configs import SearchAgentArguments
from memtrain.evaluation.scoring import MODES, TASKS


BACKENDS = ("transformers", "vllm")
MULTI_QUESTION = ("read_once", "expand")


@dataclass
class EvalConfig(AgentConfig, SearchAgentArguments):
    """Everything that decides a result; recorded with every run in results.json (a resumed run must match it)."""

    task: str = field(default="longqa", metadata={"help": f"One of {', '.join(TASKS)}."})
    modes: list[str] = field(
        default_factory=lambda: ["agent"], metadata={"help": "`agent` and/or `full_context` (the whole context)."}
    )
    num_samples: int = field(default=1, metadata={"help": "Samples per question."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy decoding."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass when sampling."})
    top_k: int = field(default=0, metadata={"help": "Top-k when sampling (0: off)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed: the same seed and batch size repeat a run."})
    max_context_tokens: int = field(
        default=8192,
        metadata={"help": "Full-context mode: prompts longer than this are skipped (reported per bucket)."},
    )
    answer_extraction: str = field(
        default="lenient",
        metadata={
            "help": "longqa/search answer: `strict` = last \\boxed{} only; `lenient` also takes unboxed replies."
        },
    )
    bucket_column: str = field(default="num_docs", metadata={"help": "Column grouping rows into length buckets."})
    batch_size: int = field(default=8, metadata={"help": "Rows per batched rollout."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate the first LIMIT rows of each bucket."})
    num_trajectory_pages: int = field(
        default=4, metadata={"help": "Trajectory HTML pages for the first K examples of each mode."}
    )
    recall_chunk_policy: str = field(
        default="any", metadata={"help": "memtrain task: the recall probe masks `any` read chunk or the `latest`."}
    )
    recall_samples: int = field(default=1, metadata={"help": "memtrain task: answers per recall probe."})
    multi_question: str = field(
        default="expand",
        metadata={
            "help": "Rows with a list of questions over one context: `expand` (one row and one read per question: "
            "MemAgent's protocol, each memory is built for its own question) or `read_once` (the memory agent reads "
            "the context once with every question of the row in its problem, then answers each question from that "
            "final memory: one read instead of one per question, but one memory budget shared by all of them)."
        },
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} is unknown; use one of {', '.join(TASKS)}.")
        self.modes = tuple(self.modes)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"--modes {list(self.modes)}: use one or more of {', '.join(MODES)}.")
        if self.task == "search" and "full_context" in self.modes:
            raise ValueError("--task search has no context for --modes full_context; use --modes agent.")
        for name in ("num_samples", "chunk_size", "max_chunks", "max_problem_tokens", "max_memory_tokens",
                     "max_answer_tokens", "max_context_tokens", "batch_size", "recall_samples", "search_max_turns",
                     "search_topk", "search_observation_tokens", "search_max_new_tokens"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"Need --temperature >= 0 and 0 < --top_p <= 1, got {self.temperature}, {self.top_p}.")
        if self.answer_extraction not in ("strict", "lenient"):
            raise ValueError(f"--answer_extraction must be strict or lenient, got {self.answer_extraction!r}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1 rows per bucket, got {self.limit}.")
        if self.recall_chunk_policy not in ("any", "latest"):
            raise ValueError(f"--recall_chunk_policy must be any or latest, got {self.recall_chunk_policy!r}.")
        if self.multi_question not in MULTI_QUESTION:
            raise ValueError(
                f"--multi_question must be one of {', '.join(MULTI_QUESTION)}, got {self.multi_question!r}."
            )
        AgentConfig.__post_init__(self)  # the templates' placeholders

    def sampling(self, max_new_tokens: int):
        from memtrain.agent.generation import SamplingConfig

        return SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            do_sample=self.temperature > 0,
            seed=self.seed,
        )

    def agent_config(self) -> AgentConfig:
        """The memory agent's settings, exactly the ``AgentConfig`` fields of this config."""
        return AgentConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AgentConfig)})


@dataclass
class EvalArguments:
    """Where the model and the rows come from, and where the results go (not part of a result's settings)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Packaged name (smollm2-135m), local folder, adapter, .gguf or Hub id. With --base_url: the "
            "tokenizer (and default served model name). From a recipe: its model_name_or_path."
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id (see --dataset_config / --dataset_split), a local file or folder that "
            "`datasets.load_dataset` reads (jsonl, json, parquet, csv, a data folder), or a `save_to_disk` / "
            "scripts/build_*.py folder."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration (subset) of a Hub dataset."})
    dataset_split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate (default: every split but `train`, or `train` when it is the only one)."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the question (or a list of them)."})
    context_column: str = field(default="context", metadata={"help": "Column holding the long text read."})
    answers_column: str = field(
        default="answers",
        metadata={"help": "Column of accepted answers: a list of strings, or one list per question of the row."},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where results.json/.md, the plot, pages and scored_rows.jsonl go."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Discard the scored rows of an earlier run with other settings in --output_dir."},
    )
    label: str | None = field(default=None, metadata={"help": "Row name in the results table (default: the model)."})
    backend: str = field(
        default="transformers",
        metadata={"help": "`transformers` (generate) or `vllm` (an in-process vllm.LLM; needs vLLM and a GPU)."},
    )
    base_url: str | None = field(
        default=None, metadata={"help": "Evaluate a model served by an OpenAI-compatible server at this URL."}
    )
    served_model_name: str | None = field(default=None, metadata={"help": "Model name sent to --base_url."})
    max_batch_size: int | None = field(
        default=None, metadata={"help": "transformers backend: sequences per generate call."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "vllm backend: share of GPU memory the engine may take."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vllm backend: context length of the engine (default: the model's)."}
    )
    longqa_num_docs: list[int] | None = field(
        default=None,
        metadata={
            "help": "Build long-text QA buckets with these document counts from raw HotpotQA rows in --dataset."
        },
    )
    longqa_num_questions: int | None = field(default=None, metadata={"help": "Questions per built bucket."})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}.")
        if self.base_url and self.backend != "transformers":
            raise ValueError("--base_url evaluates a served model; drop --backend (it picks an in-process engine).")
