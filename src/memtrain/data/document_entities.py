"""Entity candidates of a whole rendered document, tagged once, with character offsets (the ``entities`` column).

Recall probes (PAPER.md section 4) mask one spaCy entity of a chunk the memory has read. Tagging every chunk of
every rollout at train time keeps the GPU waiting on the CPU each step, so the MemTrain builder stores each
document's candidates and the trainer maps them onto its token chunks (:mod:`memtrain.agent.recall`).

The unit spaCy runs on is the paragraph, as in the paper's entity rule (its occurrence count is per paragraph): the
context is split at the document separator (a blank line), a block rendered by the document template ("Document
12:\\n<paragraph>") is reduced to its paragraph, and a very long block is split at line breaks (spaCy has a length
limit). The units depend on the text alone, never on where chunks are cut, so tagging at build time and tagging a
row without the column at train time give the same candidates: both call :func:`tag_document`. Each candidate is
every whole-word occurrence of an entity the rule kept in its unit: ``{"text", "start", "end"}`` with
``context[start:end] == text``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any


__all__ = [
    "DEFAULT_SEPARATOR",
    "ENTITIES_COLUMN",
    "MAX_UNIT_CHARS",
    "document_units",
    "entities_in_ranges",
    "read_entities",
    "row_document_layout",
    "tag_document",
]

ENTITIES_COLUMN = "entities"
# How the MemTrain builder renders one paragraph; defined here, below the builder (memtrain.data.documents re-exports it).
DEFAULT_DOCUMENT_TEMPLATE = "Document {index}:\n{text}"
DEFAULT_SEPARATOR = "\n\n"
MAX_UNIT_CHARS = 20_000  # a block longer than this (no blank lines) is tagged in pieces cut at line breaks

TextsToEntities = Callable[[list[str]], list[list[str]]]
"""The paper's entity rule over texts (e.g. :func:`memtrain.agent.recall.default_entity_tools`' finder)."""


@lru_cache(maxsize=16)
def _block_pattern(template: str) -> re.Pattern[str]:
    """A whole block rendered by ``template``, its paragraph as the group ``body``."""
    parts = re.split(r"(\{index\}|\{text\})", template)
    pattern = "".join(
        r"\d+" if part == "{index}" else "(?P<body>.*)" if part == "{text}" else re.escape(part) for part in parts
    )
    return re.compile(pattern, re.DOTALL)


def _pieces(context: str, start: int, end: int, limit: int) -> Iterable[tuple[int, int]]:
    """``[start, end)`` cut into pieces of at most ``limit`` characters, at a line break or space where possible."""
    while end - start > limit:
        window = context[start : start + limit]
        cut = max(window.rfind("\n"), 0) or max(window.rfind(" "), 0) or limit
        yield start, start + cut
        start += cut
    yield start, end


def document_units(
    context: str,
    template: str | None = DEFAULT_DOCUMENT_TEMPLATE,
    separator: str = DEFAULT_SEPARATOR,
    max_chars: int = MAX_UNIT_CHARS,
) -> list[tuple[int, int]]:
    """Character spans of ``context`` that spaCy tags one by one: paragraphs (module docs), blank ones skipped."""
    blocks, position = [], 0
    while separator and (found := context.find(separator, position)) >= 0:
        blocks.append((position, found))
        position = found + len(separator)
    blocks.append((position, len(context)))
    pattern = _block_pattern(template) if template else None
    units = []
    for start, end in blocks:
        match = pattern.fullmatch(context, start, end) if pattern is not None else None
        if match is not None:
            start, end = match.span("body")
        for piece in _pieces(context, start, end, max_chars):
            if context[piece[0] : piece[1]].strip():
                units.append(piece)
    return units


def _occurrences(text: str, entity: str) -> list[tuple[int, int]]:
    """Whole-word (case-sensitive) occurrences of ``entity`` in ``text``, else any occurrence (a custom finder)."""
    spans = [m.span() for m in re.finditer(r"(?<!\w)" + re.escape(entity) + r"(?!\w)", text)]
    return spans or [m.span() for m in re.finditer(re.escape(entity), text)]


def tag_document(
    context: str,
    find_entities: TextsToEntities,
    *,
    template: str | None = DEFAULT_DOCUMENT_TEMPLATE,
    separator: str = DEFAULT_SEPARATOR,
    within: Sequence[tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """The entity candidates of ``context``: ``{"text", "start", "end"}`` per occurrence, sorted by position.

    ``within``: tag only the units that overlap these character ranges (the chunks a truncated context keeps);
    every unit is tagged on its own, so the candidates inside the ranges are the same as tagging all of them.
    """
    units = document_units(context, template, separator)
    if within is not None:
        units = [(s, e) for s, e in units if any(s < hi and lo < e for lo, hi in within)]
    texts = [context[s:e] for s, e in units]
    found = find_entities(texts) if texts else []
    spans = set()
    for (offset, _), text, entities in zip(units, texts, found):
        for entity in entities:
            if entity:
                spans.update((offset + a, offset + b, entity) for a, b in _occurrences(text, entity))
    return [{"text": text, "start": start, "end": end} for start, end, text in sorted(spans)]


def read_entities(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A row's stored candidates whose offsets index its context exactly; None when the row has no such column."""
    stored = row.get(ENTITIES_COLUMN)
    if stored is None:
        return None
    if isinstance(stored, str):
        stored = json.loads(stored)
    context = row.get("context") or ""
    return [
        {"text": e["text"], "start": int(e["start"]), "end": int(e["end"])}
        for e in stored
        if context[int(e["start"]) : int(e["end"])] == e["text"]
    ]


def entities_in_ranges(
    entities: Sequence[Mapping[str, Any]], ranges: Sequence[tuple[int, int]], chunk: str | None = None
) -> list[str]:
    """The distinct entity texts (case-insensitively, first kept) whose span lies inside one of ``ranges``.

    ``chunk`` (the decoded chunk text), if given, must contain the entity too: a chunk cut inside a multi-byte
    character decodes it as a replacement character, and an entity there cannot be masked in that chunk.
    """
    kept: dict[str, str] = {}
    for entity in entities:
        start, end, text = entity["start"], entity["end"], entity["text"]
        if text.casefold() in kept or not any(lo <= start and end <= hi for lo, hi in ranges):
            continue
        if chunk is None or text in chunk:
            kept[text.casefold()] = text
    return list(kept.values())


def row_document_layout(row: Mapping[str, Any]) -> tuple[str, str]:
    """The document template and separator a row was built with (its ``builder_config``), else the defaults."""
    config = row.get("builder_config")
    if isinstance(config, str) and config:
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            config = None
    config = config if isinstance(config, Mapping) else {}
    template = config.get("document_template")
    separator = config.get("separator")
    return (
        template if isinstance(template, str) else DEFAULT_DOCUMENT_TEMPLATE,
        separator if isinstance(separator, str) else DEFAULT_SEPARATOR,
    )
