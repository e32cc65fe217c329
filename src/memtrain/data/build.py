"""``scripts/build_dataset.py``: recipe -> corpus -> MemTrain documents -> disk (+ Hub), all or nothing.

``python scripts/build_dataset.py recipes/data/memtrain-wiki-cpu.yaml [--key value ...]``. The output folder holds
``dataset/`` (``save_to_disk``), ``data/train-00000-of-00001.parquet``, the dataset card ``README.md`` and
``build_stats.json``. It is written to a temporary sibling and renamed into place only when complete, so a failed or
interrupted build never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memtrain.data.corpus import BUILTIN_PREFIX, FORMATS, load_corpus
from memtrain.data.documents import DocumentBuilderConfig, build_documents
from memtrain.data.output import check_before_build, release_build_claim, write_built_dataset


logger = logging.getLogger(__name__)

__all__ = [
    "BuildDatasetArguments",
    "ensure_dataset",
    "main",
    "memtrain_features",
    "run_build",
    "split_held_out",
]

SAMPLE_ATTRIBUTION = (
    "The built-in sample is the 6,119-passage Wikipedia corpus of 2WikiMultihopQA (Apache-2.0) as distributed by "
    "HippoRAG (MIT); the text is by Wikipedia contributors under CC BY-SA 4.0."
)


@dataclass
class BuildDatasetArguments:
    """Where the paragraphs come from and where the dataset goes (the builder's own settings are separate)."""

    corpus: str = field(
        default=f"{BUILTIN_PREFIX}wiki-sample",
        metadata={"help": "A file, a folder, a Hub dataset id (wikimedia/wikipedia) or builtin:wiki-sample."},
    )
    corpus_format: str | None = field(default=None, metadata={"help": f"One of {', '.join(FORMATS)}; auto if unset."})
    corpus_config: str | None = field(default=None, metadata={"help": "Hub dataset config, e.g. 20231101.en."})
    corpus_split: str = field(default="train", metadata={"help": "Hub dataset split."})
    streaming: bool = field(default=False, metadata={"help": "Stream the Hub dataset instead of downloading it."})
    text_column: str | None = field(default=None, metadata={"help": "Column with the text (auto if unset)."})
    strip_html: bool = field(
        default=False, metadata={"help": "Remove HTML markup, scripts and entities (web / NQ-style pages)."}
    )
    title_column: str | None = field(default=None, metadata={"help": "Column with the title (auto if unset)."})
    id_column: str | None = field(default=None, metadata={"help": "Column with the id (auto if unset)."})
    min_words: int = field(default=10, metadata={"help": "Drop paragraphs with fewer words."})
    max_words: int = field(default=400, metadata={"help": "Split paragraphs with more words at sentence ends."})
    corpus_limit: int | None = field(default=None, metadata={"help": "Stop after this many paragraphs."})
    output_dir: str = field(default="outputs/data/memtrain-wiki", metadata={"help": "Output folder."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing output folder."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the parquet data and card to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset repo, e.g. you/memtrain-wiki."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    pretty_name: str = field(default="MemTrain Wikipedia documents", metadata={"help": "Dataset card title."})
    license: str = field(default="cc-by-sa-4.0", metadata={"help": "Licence id of the source text (card metadata)."})
    attribution: str | None = field(
        default=None, metadata={"help": "Source attribution for the card (the built-in sample's is filled in)."}
    )

    def __post_init__(self) -> None:
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("push_to_hub needs hub_dataset_id (e.g. --hub_dataset_id you/memtrain-wiki).")
        if self.corpus_format is not None and self.corpus_format not in FORMATS:
            raise ValueError(f"corpus_format must be one of {', '.join(FORMATS)}, got {self.corpus_format!r}.")


def memtrain_features() -> Any:
    """Explicit column types, so ``num_tokens`` stays int64 even when no tokenizer filled it."""
    from datasets import Features, List, Value

    return Features(
        {
            "id": Value("string"),
            "prompt": Value("string"),
            "context": Value("string"),
            "answers": List(Value("string")),
            "entity_label": Value("string"),
            "pivot_id": Value("string"),
            "pivot_title": Value("string"),
            "pivot_position": Value("int64"),
            "paragraph_ids": List(Value("string")),
            "neighbour_ids": List(Value("string")),
            "num_paragraphs": Value("int64"),
            "num_masked": Value("int64"),
            "num_tokens": Value("int64"),
            "num_words": Value("int64"),
            "builder_config": Value("string"),
            # recall-probe candidates, tagged once (memtrain.data.document_entities): no NER at train time
            "entities": List({"text": Value("string"), "start": Value("int64"), "end": Value("int64")}),
        }
    )


def run_build(args: BuildDatasetArguments, config: DocumentBuilderConfig, recipe: str | None = None) -> Path:
    """Load the corpus, build the documents, write them (and push them); returns the output folder."""
    # Fail before the expensive part (hours at paper scale), not after it.
    output_dir = check_before_build(
        args.output_dir, overwrite=args.overwrite_output_dir, push_to_hub=args.push_to_hub,
        hub_dataset_id=args.hub_dataset_id,
    )  # fmt: skip
    corpus = load_corpus(
        args.corpus,
        format=args.corpus_format,
        split=args.corpus_split,
        config=args.corpus_config,
        streaming=args.streaming,
        text_column=args.text_column,
        title_column=args.title_column,
        id_column=args.id_column,
        min_words=args.min_words,
        max_words=args.max_words,
        limit=args.corpus_limit,
        show_progress=config.show_progress,
        strip_html=args.strip_html,
    )
    result = build_documents(corpus.paragraphs, config)
    logger.info("built %d documents: %s", result.stats.built, json.dumps(result.stats.to_dict()))

    from memtrain.data.card import render_dataset_card

    attribution = args.attribution
    if attribution is None:
        builtin = args.corpus.startswith(BUILTIN_PREFIX)
        attribution = SAMPLE_ATTRIBUTION if builtin else "Text from Wikipedia, by Wikipedia contributors."
    card = render_dataset_card(
        pretty_name=args.pretty_name,
        config=config.to_dict(),
        build_stats=result.stats.to_dict(),
        corpus_stats=corpus.stats.to_dict(),
        source=args.corpus,
        license=args.license,
        attribution=attribution,
        source_config=args.corpus_config,
        source_split=args.corpus_split if not Path(args.corpus).exists() else None,
        min_words=args.min_words,
        recipe=recipe,
    )
    extra = {"corpus": corpus.stats.to_dict(), "arguments": asdict(args), "builder_config": config.to_dict()}
    from datasets import Dataset

    return write_built_dataset(
        Dataset.from_list(result.rows, features=memtrain_features()), output_dir, card=card,
        stats={"build": result.stats.to_dict(), **extra}, overwrite=args.overwrite_output_dir,
        push_to=args.hub_dataset_id if args.push_to_hub else None, private=args.hub_private,
        commit_message=f"MemTrain documents: {result.stats.built} rows",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse ``recipe.yaml [--key value ...]`` into the two dataclasses and run the build."""
    import sys

    from memtrain.configs import parse_recipe_args

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = None
    if argv and not argv[0].startswith("-"):
        recipe = argv[0]
    elif "--config" in argv:
        recipe = argv[argv.index("--config") + 1]
    args, config = parse_recipe_args(argv, (BuildDatasetArguments, DocumentBuilderConfig))
    try:
        return run_build(args, config, recipe=recipe)
    finally:
        release_build_claim(args.output_dir)  # a failed build gives its folder up at once


def ensure_dataset(data_recipe: str | Path, dataset_dir: str | Path) -> Any:
    """The built documents at ``dataset_dir`` (a ``save_to_disk`` folder), building them with the recipe if absent."""
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "dataset_info.json").is_file():
        logger.info("Building MemTrain documents with %s", data_recipe)
        main([str(data_recipe)])
    if not (dataset_dir / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"{dataset_dir} holds no dataset after building with {data_recipe}: point --dataset at the recipe's "
            "output_dir + '/dataset'."
        )
    from datasets import load_from_disk

    return load_from_disk(str(dataset_dir))


def split_held_out(dataset: Any, num_held_out: int) -> tuple[Any, Any]:
    """(training rows, held-out rows): the last ``num_held_out`` rows are held out."""
    if not 0 < num_held_out < len(dataset):
        raise ValueError(f"Need 0 < held-out documents < {len(dataset)} (the dataset's rows), got {num_held_out}.")
    cut = len(dataset) - num_held_out
    return dataset.select(range(cut)), dataset.select(range(cut, len(dataset)))
