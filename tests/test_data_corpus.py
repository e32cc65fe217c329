"""Corpus loading over the real sample formats (fixtures are slices of /work/shared/data, see fixtures/corpora)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from memtrain.data.corpus import CorpusError, load_corpus


FIXTURES = Path(__file__).parent / "fixtures" / "corpora"


@pytest.mark.parametrize(
    ("name", "rows", "first_title", "text_start"),
    [
        ("2wikimultihopqa_corpus_300.json", 300, "Teutberga", "Teutberga( died 11 November 875)"),
        ("musique_train_corpus_60.json", 60, "Journal of Mathematical Physics", "The Journal of Mathematical"),
        ("hotpotqa_train_corpus_60.json", 60, "Demon Dice", "Demon Dice, originally published as Chaos"),
        ("flashrag_sample_data_60.jsonl", 60, "Evan Morris", "Evan Morris Evan L. Morris (January 26, 1977"),
        ("r1_searcher_title_abs_40.tsv", 40, "Professional Football League of Ukraine", "Professional Football"),
        ("kilt_articles_3.jsonl", 3, "Rachel Bolan", "Rachel Bolan (born February 9, 1966)"),
    ],
)
def test_every_sample_format_loads(name, rows, first_title, text_start):
    result = load_corpus(str(FIXTURES / name))
    assert result.stats.rows == rows
    assert len(result) == result.stats.paragraphs > 0
    first = result[0]
    assert set(first) == {"id", "title", "text"}
    assert first["title"] == first_title
    assert first["text"].startswith(text_start)
    ids = [p["id"] for p in result]
    assert len(set(ids)) == len(ids)
    for paragraph in result:
        words = len(paragraph["text"].split())
        assert 10 <= words <= 400
        assert "\n" not in paragraph["text"] and "  " not in paragraph["text"]


def test_hotpotqa_sentences_are_joined_with_single_spaces():
    result = load_corpus(str(FIXTURES / "hotpotqa_train_corpus_60.json"))
    source = json.loads((FIXTURES / "hotpotqa_train_corpus_60.json").read_text())
    assert result[0]["text"] == " ".join("".join(source["Demon Dice"]).split())


def test_tsv_bom_header_less_title_text_rows():
    result = load_corpus(str(FIXTURES / "r1_searcher_title_abs_40.tsv"))
    assert result[0]["id"] == "0"  # the UTF-8 BOM is not part of the first id
    assert result[1]["title"] == "Lucy Mair"
    assert result[1]["text"].startswith("Lucy Philip Mair (28 January 1901")
    assert not any("Title:" in p["text"] for p in result)


def test_kilt_articles_split_into_paragraphs_without_markup():
    result = load_corpus(str(FIXTURES / "kilt_articles_3.jsonl"))
    assert result.stats.paragraphs > result.stats.rows  # whole articles become several paragraphs
    assert result.stats.too_short > 0  # section headings and bullets fall under min_words
    assert not any("::::" in p["text"] for p in result)
    assert {p["id"].rsplit("_", 1)[0] for p in result} == {p["title"] for p in result}


def test_parquet_gzip_jsonl_and_hf_folders_load_the_same_paragraphs(tmp_path):
    import datasets

    reference = load_corpus(str(FIXTURES / "2wikimultihopqa_corpus_300.json"))
    records = json.loads((FIXTURES / "2wikimultihopqa_corpus_300.json").read_text())
    dataset = datasets.Dataset.from_list(records)
    dataset.to_parquet(str(tmp_path / "corpus.parquet"))
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    (tmp_path / "hub_like").mkdir()
    dataset.to_parquet(str(tmp_path / "hub_like" / "train.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    sources = [
        load_corpus(str(tmp_path / "corpus.parquet")),
        load_corpus(str(tmp_path / "corpus.jsonl.gz")),
        load_corpus(str(tmp_path / "hub_like")),  # the Hugging Face `load_dataset` path
        load_corpus(str(tmp_path / "hub_like"), streaming=True),
        load_corpus(str(tmp_path / "saved")),
    ]
    assert [s.stats.format for s in sources] == ["parquet", "jsonl", "hf", "hf", "disk"]
    for loaded in sources:
        assert loaded.texts == reference.texts


def test_duplicates_empties_short_and_long_are_counted(tmp_path):
    long_text = " ".join(f"Sentence number {i} talks about the river Danube in some detail." for i in range(60))
    rows = [
        {"title": "A", "text": "The Danube flows through Vienna, Budapest and Belgrade before the Black Sea."},
        {"title": "B", "text": "the danube flows through  VIENNA, Budapest and Belgrade before the Black Sea."},
        {"title": "C", "text": ""},
        {"title": "D", "text": "Too short."},
        {"title": "E", "text": long_text},
    ]
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(rows))
    result = load_corpus(str(path), max_words=200)
    stats = result.stats
    assert (stats.rows, stats.duplicates, stats.empty, stats.too_short, stats.split_long) == (5, 1, 1, 1, 1)
    pieces = [p for p in result if p["title"] == "E"]
    assert len(pieces) == 4 and all(len(p["text"].split()) <= 200 for p in pieces)
    assert " ".join(p["text"] for p in pieces) == long_text
    assert "dropped 1 empty" in stats.summary()
    assert len(load_corpus(str(path), max_words=200, limit=2)) == 2


def test_builtin_wikipedia_sample_ships_with_the_package():
    result = load_corpus("builtin:wiki-sample")
    assert result.stats.rows == 6119
    assert len(result) > 6000


def test_bad_input_errors_name_the_source_and_the_fix(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.json"))
    (tmp_path / "corpus.xml").write_text("<xml/>")
    with pytest.raises(CorpusError, match="pass format="):
        load_corpus(str(tmp_path / "corpus.xml"))
    with pytest.raises(CorpusError, match="Unknown corpus format 'xml'"):
        load_corpus(str(FIXTURES / "musique_train_corpus_60.json"), format="xml")
    with pytest.raises(CorpusError, match=r"row 0: no column 'body'.*Available columns: \['title', 'text'\]"):
        load_corpus(str(FIXTURES / "musique_train_corpus_60.json"), text_column="body")
    (tmp_path / "odd.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(CorpusError, match="no text column found.*text_column="):
        load_corpus(str(tmp_path / "odd.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "fine text here"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match="line 2: not valid JSON"):
        load_corpus(str(tmp_path / "broken.jsonl"))
    with pytest.raises(CorpusError, match="min_words"):
        load_corpus(str(FIXTURES / "musique_train_corpus_60.json"), min_words=50, max_words=10)


SHARED_CORPORA = [
    "hipporag/data/2wikimultihopqa_corpus.json",
    "hipporag/data/musique_train_corpus.json",
    "hipporag/data/hotpotqa_train_corpus.json",
    "flashrag/indexes/sample_data.jsonl",
    "r1_searcher/wiki_samples/filtered_kilt_sample_100.jsonl",
    "r1_searcher/wiki_samples/train_np_title_abs_sample_100.tsv",
]


@pytest.mark.parametrize("relative", SHARED_CORPORA)
def test_full_shared_samples_load(shared_data, relative):
    result = load_corpus(str(shared_data / relative))
    assert result.stats.rows > 0 and len(result) > 0.5 * result.stats.rows
    assert all(p["text"] and p["id"] for p in result)


def test_limit_streams_the_first_paragraphs_in_order_and_stops_reading(tmp_path):
    # The paper's corpus is the FIRST ~300k Wikipedia paragraphs, not a sample: the paper recipe streams
    # wikimedia/wikipedia with corpus_limit. A local folder goes through the same datasets streaming path.
    records = [{"id": str(i), "title": f"T{i}", "text": f"Paragraph number {i} is about Ada Lovelace and Paris."}
               for i in range(400)]  # fmt: skip
    folder = tmp_path / "stream"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = load_corpus(str(folder), format="hf", streaming=True, min_words=3, limit=25)
    assert [p["id"] for p in result.paragraphs] == [str(i) for i in range(25)]
    assert result.stats.rows == 25  # stopped reading the stream at the limit
    import yaml

    recipe = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "recipes/data/memtrain-wiki-paper.yaml").read_text()
    )
    assert recipe["streaming"] is True and recipe["corpus_limit"] == 300_000
    assert recipe.get("filter_paragraphs", True) is True  # and only entity-bearing paragraphs are kept


LYON = (
    "Lyon is the third-largest city of France, at the confluence of the rivers Rhone and Saone, and was\n"
    "founded by the Romans as Lugdunum in 43 BC."
)
SAONE = (
    "The Saone rises at Vioménil in the Vosges and flows south for 473 kilometres before it joins the Rhone at Lyon."
)


def test_plain_text_files_are_articles_of_blank_line_paragraphs(tmp_path):
    (tmp_path / "Lyon.txt").write_text(f"Lyon\n\n{LYON}\n\n\n{SAONE}\n\nshort line\n", encoding="utf-8")
    result = load_corpus(str(tmp_path / "Lyon.txt"))
    assert result.stats.format == "txt" and result.stats.too_short == 1  # the title heading is dropped, not counted
    assert [p["text"] for p in result] == [" ".join(LYON.split()), SAONE]  # wrapped lines joined by one space
    assert [p["title"] for p in result] == ["Lyon", "Lyon"] and [p["id"] for p in result] == ["Lyon_0", "Lyon_1"]

    folder = tmp_path / "articles"
    (folder / "rivers").mkdir(parents=True)
    (folder / "rivers" / "Saone.txt").write_text(SAONE + "\n", encoding="utf-8")
    with gzip.open(folder / "Lyon.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write(LYON)
    loaded = load_corpus(str(folder))
    assert loaded.stats.format == "txt" and loaded.stats.rows == 2
    assert [(p["id"], p["title"]) for p in loaded] == [("Lyon", "Lyon"), ("rivers/Saone", "Saone")]


def test_strip_html_keeps_the_visible_text_of_web_pages(tmp_path):
    page = (
        "<html><head><title>Sa&ocirc;ne</title><style>p { color: red }</style></head><body>"
        "<script>var saone = 'not text';</script><h1>Sa&ocirc;ne</h1>"
        "<p>The <b>Sa&ocirc;ne</b> rises at Viom&eacute;nil in the Vosges and flows south for 473 kilometres "
        "before it joins the Rhone at Lyon.</p><!-- a comment --><ul><li>The river is navigable from Corre to "
        "Lyon &amp; carries barges of grain and wine.</li></ul></body></html>"
    )
    rows = tmp_path / "nq.jsonl"
    rows.write_text(json.dumps({"title": "<b>Sa&ocirc;ne</b>", "document_html": page}) + "\n", encoding="utf-8")
    result = load_corpus(str(rows), text_column="document_html", strip_html=True, min_words=5)
    assert [p["text"] for p in result] == [
        SAONE.replace("Saone rises", "Saône rises"),
        "The river is navigable from Corre to Lyon & carries barges of grain and wine.",
    ]
    assert {p["title"] for p in result} == {"Saône"}
    plain = load_corpus(str(rows), text_column="document_html", min_words=5)
    assert any("<p>" in p["text"] for p in plain)  # without the option the markup stays
    (tmp_path / "page.txt").write_text(page, encoding="utf-8")
    assert [p["text"] for p in load_corpus(str(tmp_path / "page.txt"), strip_html=True, min_words=5)] == [
        p["text"] for p in result
    ]
