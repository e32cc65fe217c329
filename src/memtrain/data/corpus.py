"""Load an unlabeled paragraph corpus from the files and Hub datasets users actually have, as ``{id, title, text}``.

MemTrain needs nothing but paragraphs (PAPER.md section 2). Users point this loader at whatever they hold:

* a Hugging Face dataset id (``wikimedia/wikipedia`` with ``config="20231101.en"``, ``streaming=True``), a local
  folder ``load_dataset`` can read, or a folder written by ``Dataset.save_to_disk``;
* local files, optionally gzip-compressed (``.gz``): a JSON list of records, JSON lines, parquet, TSV/CSV (with or
  without a header line), or a HotpotQA-style JSON dict ``title -> [sentences]``;
* plain text: a ``.txt`` file, or a folder of them, is one article per file (its title is the file name without
  ``.txt``), paragraphs separated by blank lines; the lines of a paragraph are joined (wrapped text);
* the shipped Wikipedia sample, ``builtin:wiki-sample``.

Record shapes are recognised from their columns: ``{title, text}`` passages, FlashRAG/DPR ``contents`` rows whose
first line is the quoted title, R1-Searcher's ``"Title: ... Text: ..."`` strings, and whole articles whose text is
a list of paragraphs (KILT) or one string with newline-separated paragraphs (``wikimedia/wikipedia``).

Every text is split into paragraphs at newlines, whitespace is collapsed, paragraphs above ``max_words`` are split
at sentence boundaries, and paragraphs under ``min_words`` (headings, list items), empty rows and case-insensitive
duplicates are dropped. What was dropped is counted in :class:`CorpusStats`.

``strip_html=True`` reads web / Natural Questions style pages: tags are removed (block tags such as ``<p>``, ``<li>``,
``<h2>``, ``<br>`` end a paragraph), ``<script>``/``<style>`` contents are dropped and entities are unescaped, in
texts and titles, before the paragraphs are split.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

FILE_FORMATS = ("json", "jsonl", "parquet", "tsv", "csv", "hotpotqa", "txt")
FORMATS = FILE_FORMATS + ("hf", "disk")
BUILTIN_CORPORA = {"wiki-sample": "wiki_sample_2wikimultihopqa.jsonl.gz"}
BUILTIN_PREFIX = "builtin:"

TEXT_COLUMNS = ("text", "contents", "paragraph_text", "content", "passage", "paragraph", "body")
TITLE_COLUMNS = ("title", "wikipedia_title", "page_title")
ID_COLUMNS = ("id", "_id", "wikipedia_id", "doc_id", "pid", "idx")

_SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".tsv": "tsv"}
_SUFFIX_FORMATS.update({".csv": "csv", ".txt": "txt"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TITLE_TEXT = re.compile(r"^\s*Title:\s*(.*?)\s+Text:\s*(.*)$", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_KILT_MARKUP = re.compile(r"^(Section|BULLET)::::-?\s*")


@dataclass
class CorpusStats:
    """What loading kept and dropped, so a user can see why a corpus came out smaller than its row count."""

    source: str
    format: str
    rows: int = 0
    paragraphs: int = 0
    empty: int = 0
    too_short: int = 0
    duplicates: int = 0
    split_long: int = 0
    text_column: str | None = None
    title_column: str | None = None
    id_column: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.source} ({self.format}): {self.rows} rows -> {self.paragraphs} paragraphs; dropped "
            f"{self.empty} empty, {self.too_short} under min_words, {self.duplicates} duplicates; "
            f"{self.split_long} long paragraphs split"
        )


@dataclass
class CorpusLoadResult:
    """The paragraphs (dicts with ``id``, ``title``, ``text``) and the loading report; behaves like the list."""

    paragraphs: list[dict[str, str]]
    stats: CorpusStats

    def __len__(self) -> int:
        return len(self.paragraphs)

    def __iter__(self) -> Iterator[dict[str, str]]:
        return iter(self.paragraphs)

    def __getitem__(self, index: int) -> dict[str, str]:
        return self.paragraphs[index]

    @property
    def texts(self) -> list[str]:
        return [p["text"] for p in self.paragraphs]


class CorpusError(ValueError):
    """A corpus could not be read as asked; the message names the source, row or key and the fix."""


@dataclass
class _Columns:
    text: str | None = None
    title: str | None = None
    id: str | None = None
    resolved: bool = False
    explicit: dict[str, str | None] = field(default_factory=dict)


def builtin_corpus_path(name: str) -> Path:
    """Path of a corpus shipped inside the package (``wiki-sample``: 6,119 Wikipedia passages from 2WikiMultihopQA)."""
    if name not in BUILTIN_CORPORA:
        raise CorpusError(f"Unknown built-in corpus {name!r}; available: {', '.join(sorted(BUILTIN_CORPORA))}.")
    return Path(__file__).resolve().parents[1] / "resources" / BUILTIN_CORPORA[name]


def load_corpus(
    source: str,
    *,
    format: str | None = None,
    split: str = "train",
    config: str | None = None,
    streaming: bool = False,
    text_column: str | None = None,
    title_column: str | None = None,
    id_column: str | None = None,
    min_words: int = 10,
    max_words: int = 400,
    limit: int | None = None,
    show_progress: bool = False,
    strip_html: bool = False,
) -> CorpusLoadResult:
    """Load ``source`` as de-duplicated paragraphs ``{id, title, text}`` with word counts in [min_words, max_words].

    ``format`` is detected from the file suffix and content when not given (one of :data:`FORMATS`). ``split``,
    ``config`` and ``streaming`` apply to Hugging Face datasets. ``limit`` stops after that many kept paragraphs
    (useful with streaming). Column names are guessed from common spellings unless given. ``strip_html`` turns
    HTML pages into their text first (see the module docstring).
    """
    if min_words < 1 or max_words < min_words:
        raise CorpusError(f"Need 1 <= min_words <= max_words, got min_words={min_words}, max_words={max_words}.")
    if limit is not None and limit < 1:
        raise CorpusError(f"limit must be a positive number of paragraphs or None, got {limit}.")
    path, fmt = _detect(source, format)
    stats = CorpusStats(source=str(source), format=fmt)
    columns = _Columns(explicit={"text": text_column, "title": title_column, "id": id_column})
    rows = _named_decode_errors(_iter_rows(path, fmt, source, split=split, config=config, streaming=streaming), path)
    if show_progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=f"reading {Path(str(source)).name}", unit=" rows")

    paragraphs: list[dict[str, str]] = []
    seen_text: set[str] = set()
    seen_ids: set[str] = set()
    for row_index, row in rows:
        stats.rows += 1
        title, pieces, base_id = _normalise_row(row, row_index, fmt, columns, source, strip_html)
        stats.text_column, stats.title_column, stats.id_column = columns.text, columns.title, columns.id
        split_pieces: list[str] = []
        for piece in pieces:
            words = piece.split()
            if len(words) > max_words:
                stats.split_long += 1
                split_pieces.extend(_split_long(piece, max_words))
            else:
                split_pieces.append(" ".join(words))
        if not split_pieces:
            stats.empty += 1
            continue
        for j, text in enumerate(split_pieces):
            if len(text.split()) < min_words:
                stats.too_short += 1
                continue
            key = text.casefold()
            if key in seen_text:
                stats.duplicates += 1
                continue
            seen_text.add(key)
            pid = base_id if len(split_pieces) == 1 else f"{base_id}_{j}"
            if pid in seen_ids:
                pid = f"{pid}_row{row_index}"
            seen_ids.add(pid)
            paragraphs.append({"id": pid, "title": title, "text": text})
            if limit is not None and len(paragraphs) >= limit:
                break
        if limit is not None and len(paragraphs) >= limit:
            break
    stats.paragraphs = len(paragraphs)
    if stats.rows == 0:
        raise CorpusError(f"{source}: no rows were read (empty file or split {split!r}).")
    if not paragraphs:
        raise CorpusError(
            f"{source}: none of its {stats.rows} row(s) holds a paragraph of at least min_words {min_words} words "
            f"({stats.empty} empty, {stats.too_short} shorter); give text, or lower --min_words."
        )
    logger.info(stats.summary())
    return CorpusLoadResult(paragraphs=paragraphs, stats=stats)


def _named_decode_errors(rows: Iterator[tuple[int, Any]], path: Path | None) -> Iterator[tuple[int, Any]]:
    """The rows; a file that is not UTF-8 is named (with its line) in one line instead of a bare codec error."""
    from memtrain.preflight import not_utf8

    try:
        yield from rows
    except UnicodeDecodeError as error:
        file = getattr(error, "memtrain_file", None) or path
        raise CorpusError(str(not_utf8(file, error, "Corpus file")) if file else str(error)) from None


def _detect(source: str, format: str | None) -> tuple[Path | None, str]:
    if format is not None and format not in FORMATS:
        raise CorpusError(f"Unknown corpus format {format!r} for {source}; supported: {', '.join(FORMATS)}.")
    source = str(source)
    if source.startswith(BUILTIN_PREFIX):
        return builtin_corpus_path(source[len(BUILTIN_PREFIX) :]), format or "jsonl"
    path = Path(source).expanduser()
    if path.is_dir():
        if format is not None:
            return path, format
        is_saved = (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        if not is_saved and _text_files(path) and not any(_is_data_file(f) for f in path.rglob("*")):
            return path, "txt"  # a folder of plain-text articles
        return path, "disk" if is_saved else "hf"
    if path.is_file():
        if format is not None:
            return path, format
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] == ".gz":
            suffixes = suffixes[:-1]
        suffix = suffixes[-1] if suffixes else ""
        if suffix not in _SUFFIX_FORMATS:
            raise CorpusError(
                f"Cannot tell the format of {path} from its suffix {suffix or '(none)'}; pass format= one of "
                f"{', '.join(FILE_FORMATS)} (or name the file .json/.jsonl/.parquet/.tsv/.csv/.txt, optionally .gz)."
            )
        return path, _SUFFIX_FORMATS[suffix]
    if format == "hf" or (format is None and _HUB_ID.match(source) and not Path(source).suffix):
        return None, "hf"
    raise CorpusError(
        f"Corpus file {source} does not exist. Pass an existing file or folder, a Hugging Face dataset id "
        f"(e.g. wikimedia/wikipedia), or {BUILTIN_PREFIX}wiki-sample for the shipped sample."
    )


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _iter_rows(
    path: Path | None, fmt: str, source: str, *, split: str, config: str | None, streaming: bool
) -> Iterator[tuple[int, Any]]:
    if fmt == "hf":
        yield from enumerate(_load_hf(path, source, split=split, config=config, streaming=streaming))
    elif fmt == "disk":
        yield from enumerate(_load_disk(path, split))
    elif fmt == "parquet":
        yield from enumerate(_read_parquet(path))
    elif fmt == "jsonl":
        yield from _read_jsonl(path)
    elif fmt in ("json", "hotpotqa"):
        yield from _read_json(path, fmt)
    elif fmt in ("tsv", "csv"):
        yield from _read_delimited(path, "\t" if fmt == "tsv" else ",")
    elif fmt == "txt":
        yield from _read_text_files(path)
    else:  # pragma: no cover - _detect validates
        raise CorpusError(f"Unknown format {fmt!r}.")


def _load_hf(path: Path | None, source: str, *, split: str, config: str | None, streaming: bool) -> Iterable[Any]:
    import datasets

    try:
        return datasets.load_dataset(str(path or source), config, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise CorpusError(
            f"Could not load the Hugging Face dataset {source!r} (config={config!r}, split={split!r}): {err}. "
            "Check the id, config and split; with HF_DATASETS_OFFLINE=1 only datasets already in the cache load; "
            "for a local file give its path."
        ) from err


def _load_disk(path: Path, split: str) -> Iterable[Any]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise CorpusError(f"{path} has splits {sorted(loaded)}, not {split!r}; pass split= one of them.")
        return loaded[split]
    return loaded


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:
        raise CorpusError(f"{path} is not a readable parquet file: {err}.") from err
    for batch in parquet.iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(path) as handle:
        row = 0
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}, line {line_number}: not valid JSON ({err}). Each line must be one JSON "
                                  "object; a file holding one JSON list should be named .json.") from err  # fmt: skip
            yield row, record
            row += 1


def _read_json(path: Path, fmt: str) -> Iterator[tuple[int, Any]]:
    with _open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}: not valid JSON ({err}). JSON lines files should be named .jsonl.") from err
    if isinstance(data, dict) and fmt == "json" and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict):
        # HotpotQA corpus style: title -> list of sentences (or one string)
        bad = next((k for k, v in data.items() if not isinstance(v, (list, str))), None)
        if bad is not None:
            raise CorpusError(
                f"{path}: a JSON object must map titles to sentence lists (HotpotQA corpus style), but key {bad!r} "
                f"holds a {type(data[bad]).__name__}. Use a JSON list of records instead."
            )
        for i, (title, sentences) in enumerate(data.items()):
            yield i, {"title": title, "__sentences__": sentences, "id": title}
        return
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a JSON list of records or a title -> sentences object, got "
                          f"{type(data).__name__}.")  # fmt: skip
    yield from enumerate(data)


def _read_delimited(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    csv.field_size_limit(sys.maxsize)
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header: list[str] | None = None
        row_index = 0
        for line_number, fields in enumerate(reader, start=1):
            if not fields or all(not f.strip() for f in fields):
                continue
            if line_number == 1 and header is None:
                lowered = [f.strip().lower() for f in fields]
                if any(name in lowered for name in TEXT_COLUMNS + TITLE_COLUMNS):
                    header = [f.strip() for f in fields]
                    continue
            if header is None:
                # no header: DPR order (id, text, title) or a single text column
                names = ["id", "text", "title"] if len(fields) >= 2 else ["text"]
                if len(fields) > 3:
                    names += [f"column_{i}" for i in range(3, len(fields))]
                record = dict(zip(names, fields))
            else:
                if len(fields) != len(header):
                    raise CorpusError(f"{path}, line {line_number}: {len(fields)} fields but the header has "
                                      f"{len(header)} ({header}). Fix the quoting or the delimiter.")  # fmt: skip
                record = dict(zip(header, fields))
            yield row_index, record
            row_index += 1


def _is_data_file(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return path.is_file() and Path(name).suffix in _SUFFIX_FORMATS and not name.endswith(".txt")


def _text_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.name.lower().endswith((".txt", ".txt.gz")))


def _read_text_files(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """One row per ``.txt`` file (a folder: every ``.txt`` below it, sorted): its title is the file's name."""
    files = _text_files(path) if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"{path} holds no .txt files; pass a .txt file or a folder of them.")
    for index, file in enumerate(files):
        try:
            with _open_text(file) as handle:
                text = handle.read()
        except UnicodeDecodeError as error:
            error.memtrain_file = file  # a folder of .txt files: name the file, not the folder
            raise
        title = file.name[: -len(".txt.gz")] if file.name.lower().endswith(".txt.gz") else file.stem
        relative = file.relative_to(path) if path.is_dir() else Path(file.name)
        yield index, {"id": str(relative.with_name(title)), "title": title, "__blocks__": text}


_BLOCK_TAGS = frozenset(
    "address article aside blockquote br dd div dl dt figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr li "
    "main nav ol p pre section table tbody thead tr ul title".split()
)
_SKIPPED_TAGS = frozenset({"script", "style", "noscript", "template", "head"})


class _HTMLText(HTMLParser):
    """The visible text of an HTML page, a blank line at every block boundary."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS and tag != "head":
            self.skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS and tag != "head":
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """Plain text of an HTML page or fragment: paragraphs (one a line) from its blocks, markup and scripts gone."""
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    blocks = (" ".join(block.split()) for block in re.split(r"\n\s*\n", "".join(parser.parts)))
    return "\n".join(block for block in blocks if block)


def _strip_value(value: Any) -> Any:
    if isinstance(value, str):
        return strip_html(value)
    if isinstance(value, list):
        return [strip_html(v) if isinstance(v, str) else v for v in value]
    return value


def _blocks(text: str) -> list[str]:
    """Paragraphs of a plain-text file: blank-line separated blocks, each block's lines joined by a space."""
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if block.strip()]


def _pick(keys: Iterable[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {k.lower(): k for k in keys}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _resolve_columns(row: dict[str, Any], columns: _Columns, source: str, row_index: int) -> None:
    keys = [k for k in row if k not in ("__sentences__", "__blocks__")]
    for kind, candidates in (("text", TEXT_COLUMNS), ("title", TITLE_COLUMNS), ("id", ID_COLUMNS)):
        wanted = columns.explicit.get(kind)
        if wanted is not None:
            if wanted not in row:
                raise CorpusError(
                    f"{source}, row {row_index}: no column {wanted!r} (the {kind}_column you asked for). "
                    f"Available columns: {keys}. Pass {kind}_column= one of them."
                )
            setattr(columns, kind, wanted)
        else:
            setattr(columns, kind, _pick(keys, candidates))
    if columns.text is None and "__sentences__" not in row and "__blocks__" not in row:
        raise CorpusError(
            f"{source}, row {row_index}: no text column found among {keys} (looked for {', '.join(TEXT_COLUMNS)}). "
            "Pass text_column= naming the column that holds the paragraph text."
        )
    columns.resolved = True


def _join_sentences(sentences: list[str]) -> str:
    out = ""
    for sentence in sentences:
        if not isinstance(sentence, str):
            continue
        if out and not out[-1].isspace() and not sentence[:1].isspace():
            out += " "
        out += sentence
    return out


def _paragraphs_of(value: Any) -> list[str]:
    """Split a text value (a string, or a list of paragraph strings) into non-empty paragraphs."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            continue
        for line in item.split("\n"):
            line = _KILT_MARKUP.sub("", line).strip() if "::::" in line else line.strip()
            if line:
                out.append(line)
    return out


def _normalise_row(
    row: Any, row_index: int, fmt: str, columns: _Columns, source: str, strip: bool = False
) -> tuple[str, list[str], str]:
    if not isinstance(row, dict):
        raise CorpusError(f"{source}, row {row_index}: expected a record (JSON object), got {type(row).__name__}.")
    if not columns.resolved:
        _resolve_columns(row, columns, source, row_index)
    title = row.get(columns.title) if columns.title else None
    title = str(title).strip() if title is not None else ""
    if strip:
        title = " ".join(strip_html(title).split())
    if "__blocks__" in row:  # a plain-text file: blank lines separate paragraphs (HTML: its blocks do)
        text = row["__blocks__"]
        pieces = [p for p in strip_html(text).split("\n") if p] if strip else _blocks(text)
        if pieces and title and pieces[0].casefold() == title.casefold():
            pieces = pieces[1:]  # a heading that repeats the file's title
        return title, pieces, str(row["id"])
    raw_id = row.get(columns.id) if columns.id else None
    base_id = str(raw_id) if raw_id not in (None, "") else (title or f"row{row_index}")
    if "__sentences__" in row:
        value = row["__sentences__"]
        text = _join_sentences(value) if isinstance(value, list) else value
        return title, _paragraphs_of(_strip_value(text) if strip else text), base_id
    value = row.get(columns.text)
    if strip:
        value = _strip_value(value)
    if isinstance(value, str) and not title:
        value, title = _split_embedded_title(value, columns.text or "")
        if raw_id in (None, "") and title:
            base_id = title
    pieces = _paragraphs_of(value)
    if isinstance(value, list) and pieces and title and pieces[0] == title:
        pieces = pieces[1:]  # KILT articles repeat the title as their first paragraph
    return title, pieces, base_id


def _split_embedded_title(text: str, column: str) -> tuple[str, str]:
    """Recover titles stored inside the text: FlashRAG/DPR ``"Title"\\ntext`` and ``Title: X Text: Y``."""
    match = _TITLE_TEXT.match(text)
    if match:
        return match.group(2), match.group(1).strip()
    if column.lower() == "contents" and "\n" in text:
        first, rest = text.split("\n", 1)
        first = first.strip()
        if len(first) >= 2 and first[0] == first[-1] == '"':
            first = first[1:-1]
        return rest, first.strip()
    return text, ""


def _split_long(paragraph: str, max_words: int) -> list[str]:
    """Split at sentence ends into near-equal pieces of at most ``max_words`` (hard word cut for huge sentences)."""
    words = paragraph.split()
    target = math.ceil(len(words) / math.ceil(len(words) / max_words))
    pieces: list[str] = []
    current: list[str] = []
    for sentence in _SENTENCE_END.split(" ".join(words)):
        sentence_words = sentence.split()
        while len(sentence_words) > max_words:
            if current:
                pieces.append(" ".join(current))
                current = []
            pieces.append(" ".join(sentence_words[:max_words]))
            sentence_words = sentence_words[max_words:]
        if current and len(current) + len(sentence_words) > max_words:
            pieces.append(" ".join(current))
            current = []
        current.extend(sentence_words)
        if len(current) >= target:
            pieces.append(" ".join(current))
            current = []
    if current:
        pieces.append(" ".join(current))
    return pieces
