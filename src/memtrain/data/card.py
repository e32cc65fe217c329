"""The dataset card of a built MemTrain dataset, rendered from ``hub_cards/dataset_card.md``.

The card records what a user needs to trust and reproduce the data: the builder settings, what was kept and dropped
(corpus loading and the leak policy), the entity label histogram, the source and its licence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from memtrain.agent.prompts import MEMTRAIN_PROBLEM
from memtrain.data.output import card_data_files
from memtrain.hub import hub_card_template


__all__ = ["DATASET_CARD_TEMPLATE", "render_dataset_card"]

DATASET_CARD_TEMPLATE = "dataset_card.md"
_LICENSE_NAMES = {
    "cc-by-sa-4.0": "CC BY-SA 4.0",
    "cc-by-sa-3.0": "CC BY-SA 3.0",
    "cc-by-4.0": "CC BY 4.0",
    "apache-2.0": "Apache-2.0",
    "mit": "MIT",
}


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "1M<n<10M"


def _setting_value(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text.replace("|", "\\|")


def render_dataset_card(
    *,
    pretty_name: str,
    config: Mapping[str, Any],
    build_stats: Mapping[str, Any],
    corpus_stats: Mapping[str, Any],
    source: str,
    license: str = "cc-by-sa-4.0",
    attribution: str = "Text from Wikipedia, by Wikipedia contributors.",
    source_config: str | None = None,
    source_split: str | None = None,
    min_words: int | None = None,
    recipe: str | None = None,
) -> DatasetCard:
    """A :class:`huggingface_hub.DatasetCard` describing one build (``config``/``*_stats`` as plain dicts)."""
    built = int(build_stats.get("built", 0))
    card_data = DatasetCardData(
        language=["en"],
        license=license,
        pretty_name=pretty_name,
        size_categories=[_size_category(built)],
        task_categories=["question-answering"],
        tags=["memtrain", "self-supervised", "long-context", "memory-agent", "wikipedia"],
        configs=[{"config_name": "default", "data_files": card_data_files(["train"])}],
    )
    method = config.get("neighbour_method", "bm25")
    if method == "dense":
        neighbour_description = f"dense cosine search with {config.get('embedding_model') or 'BAAI/bge-base-en-v1.5'}"
    else:
        neighbour_description = "BM25"
    low, high = config.get("min_tokens"), config.get("max_tokens")
    token_window = "none" if low is None and high is None else f"[{low or 0}, {high if high is not None else '∞'}]"
    card = DatasetCard.from_template(
        card_data,
        template_path=str(hub_card_template(DATASET_CARD_TEMPLATE)),
        config=dict(config),
        stats=dict(build_stats),
        corpus=dict(corpus_stats),
        settings=[(key, _setting_value(value)) for key, value in sorted(config.items())],
        neighbour_description=neighbour_description,
        token_window=token_window,
        problem=MEMTRAIN_PROBLEM,
        source=source,
        source_config=source_config,
        source_split=source_split,
        license_name=_LICENSE_NAMES.get(license, license),
        attribution=attribution,
        min_words=min_words if min_words is not None else "min_words",
        recipe=recipe,
    )
    return card
