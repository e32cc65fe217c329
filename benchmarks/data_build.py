"""How fast the MemTrain data pipeline is here, what the paper's scale would cost, and how often masking leaks.

    python benchmarks/data_build.py                      # both methods, 100 paper-size documents each, + audit
    python benchmarks/data_build.py --methods bm25 --num_documents 50
    python benchmarks/data_build.py --audit_only         # leaks, guards and recall candidates on two corpora

For each neighbour method (in its own process, so peak memory is per method) it builds paper-size documents
(1 pivot + 29 neighbours + 120 random = 150 paragraphs, SmolLM2 token counts) from the 6,119-passage 2Wiki corpus
and prints documents per minute. For bm25 it then indexes a 300k-paragraph corpus (sentences of the real corpus
resampled into paragraphs of the same length distribution: real vocabulary and posting-list sizes) and times
retrieval there, to extrapolate the paper's 30k documents from 300k paragraphs.

The audit (always run; alone with ``--audit_only``) builds documents from the shipped sample (2Wiki passages, JSON
lines) and from a HotpotQA corpus (a ``title -> sentences`` JSON dict: the full 994-paragraph file of
/work/shared/data when present, else the 60-paragraph test fixture) and prints, per corpus:

- the leak rate under the leak definition of :mod:`memtrain.data.entities` (any form equal to the answer under the
  answer metrics' normalisation: case, punctuation, quotes, articles, whitespace, accents, plus plurals and
  possessives), for the reference code's masking (case-sensitive ``\\b`` regex), for the previous memtrain policy
  (case-insensitive tolerant masking only) and for ours, on the chosen answers and over every valid pivot entity;
- the entities each guard dropped (``common_word``, ``embedded``, ``in_token``, ``in_template``, ``no_content``)
  and the paragraphs the corpus entity filter removed;
- recall-probe candidates in 500-token chunks of the built documents rejected as template text ("Document 12:"
  headers) and as cut by a chunk edge.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

SHARED_2WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "hipporag/data/2wikimultihopqa_corpus.json"
SHARED_HOTPOT = SHARED_2WIKI.parent / "hotpotqa_train_corpus.json"
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "corpora"
PAPER_DOCUMENTS, PAPER_PARAGRAPHS = 30_000, 300_000


def AUDIT_CORPORA() -> list[tuple[str, str]]:  # noqa: N802 - a constant that looks at the disk when asked
    """The shipped sample (JSON lines of {title, text}) and a HotpotQA title -> sentences dict (another format)."""
    hotpot = SHARED_HOTPOT if SHARED_HOTPOT.is_file() else FIXTURES / "hotpotqa_train_corpus_60.json"
    return [("builtin:wiki-sample", "shipped sample (2Wiki passages)"), (str(hotpot), f"HotpotQA ({hotpot.name})")]


def _corpus():
    from memtrain.data.corpus import load_corpus

    source = str(SHARED_2WIKI) if SHARED_2WIKI.is_file() else "builtin:wiki-sample"
    return load_corpus(source)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference_mask(text: str, entity: str) -> str:
    """The reference code's rule: case-sensitive word-boundary regex."""
    return re.sub(r"\b" + re.escape(entity) + r"\b", "[MASK]", text)


def previous_mask(text: str, entity: str) -> str | None:
    """memtrain's policy before the normalised leak definition: tolerant case-insensitive whole-word masking, and
    entities left inside longer words rejected (None); no variant forms, no ordinary-word guard."""
    from memtrain.data.entities import _leak_pattern, _mask_pattern

    masked = _mask_pattern(entity).sub("[MASK]", text)
    return None if _leak_pattern(entity).search(masked) else masked


def _render(bodies) -> str:
    return "\n\n".join(f"Document {i + 1}:\n{b}" for i, b in enumerate(bodies))


def leak_comparison(rows, paragraphs, extractor) -> dict:
    """Leak rates under the normalised leak definition (find_leaks): reference rule vs previous policy vs ours."""
    from collections import Counter

    from memtrain.data.entities import EntityLeakError, find_leaks, mask_entity_in_texts

    by_id = {p["id"]: p["text"] for p in paragraphs}
    pivots = [by_id[r["pivot_id"]] for r in rows]
    chosen = Counter()
    pairs = Counter()
    dropped = Counter()
    for row, entities in zip(rows, extractor(pivots)):
        bodies = [by_id[pid] for pid in row["paragraph_ids"]]
        unmasked = _render(bodies)
        answer = row["answers"][0]
        chosen["reference"] += bool(find_leaks(reference_mask(unmasked, answer), answer))
        previous = previous_mask(unmasked, answer)
        chosen["previous"] += previous is not None and bool(find_leaks(previous, answer))
        chosen["ours"] += bool(find_leaks(row["context"], answer))
        for entity in entities:  # every valid entity of the pivot: what a random pick could have been
            pairs["all"] += 1
            pairs["reference"] += bool(find_leaks(reference_mask(unmasked, entity.text), entity.text))
            previous = previous_mask(unmasked, entity.text)
            if previous is None:
                pairs["previous_dropped"] += 1
            else:
                pairs["previous"] += bool(find_leaks(previous, entity.text))
            try:
                masked, _ = mask_entity_in_texts(bodies, entity.text)
            except EntityLeakError as err:
                dropped[err.reason] += 1
                continue
            rendered = _render(masked)
            if find_leaks(rendered, entity.text):
                dropped["in_template"] += 1  # the builder drops these too (entity inside a "Document i:" header)
                continue
            pairs["ours_masked"] += 1
            pairs["ours"] += bool(find_leaks(rendered, entity.text))
    n, total = max(len(rows), 1), max(pairs["all"], 1)
    return {
        "documents": len(rows),
        "reference_leak_rate_chosen": chosen["reference"] / n,
        "previous_leak_rate_chosen": chosen["previous"] / n,
        "ours_leak_rate_chosen": chosen["ours"] / n,
        "entity_pairs": pairs["all"],
        "reference_leak_rate_all_entities": pairs["reference"] / total,
        "previous_leak_rate_all_entities": pairs["previous"] / total,
        "ours_leak_rate_all_entities": pairs["ours"] / total,
        "ours_dropped_rate_all_entities": sum(dropped.values()) / total,
        "ours_dropped_by_guard_all_entities": dict(dropped),
    }


def recall_candidate_audit(rows, tokenizer, extractor, chunk_size: int) -> dict:
    """Valid entities of the documents' token chunks, and how many each recall guard rejects."""
    from collections import Counter

    from memtrain.agent.chunking import chunk_context
    from memtrain.agent.recall import probe_candidates

    chunks = [c for row in rows for c in chunk_context(tokenizer, row["context"], chunk_size, 10_000).chunks]
    counts: Counter[str] = Counter()
    for chunk, entities in zip(chunks, extractor(chunks)):
        probe_candidates(chunk, [e.text for e in entities], counts=counts)
    return {"documents": len(rows), "chunk_size": chunk_size, "chunks": len(chunks), **counts}


def audit(source: str, label: str, args) -> dict:
    """Build documents from one corpus and report leaks, guard drops and recall-candidate rejections."""
    from memtrain.data.corpus import load_corpus
    from memtrain.data.documents import DocumentBuilderConfig, build_documents
    from memtrain.data.entities import EntityExtractor
    from memtrain.models import load_tokenizer

    corpus = load_corpus(source)
    tokenizer = load_tokenizer("smollm2-135m")
    extractor = EntityExtractor()
    neighbours, random_ = (29, 120) if len(corpus) >= 1000 else (4, 5)  # the CPU recipe's size on a small corpus
    config = DocumentBuilderConfig(
        num_documents=args.audit_documents, num_neighbours=neighbours, num_random=random_, show_progress=False
    )
    start = time.perf_counter()
    result = build_documents(corpus.paragraphs, config, extractor=extractor)
    stats = result.stats
    recall_rows = result.rows[: args.recall_documents]
    return {
        "corpus": label,
        "source": source,
        "format": corpus.stats.format,
        "corpus_paragraphs": len(corpus),
        "paragraphs_without_entity": stats.paragraphs_without_entity,
        "paragraphs_per_document": config.paragraphs_per_document,
        "documents": stats.built,
        "builder_entities_dropped": stats.entities_dropped,
        "pivots_all_entities_dropped": stats.pivots_all_entities_leak,
        "leaks": leak_comparison(result.rows, corpus.paragraphs, extractor),
        "recall_candidates": recall_candidate_audit(recall_rows, tokenizer, extractor, args.chunk_size),
        "seconds": round(time.perf_counter() - start, 1),
    }


def print_audit(report: dict) -> None:
    leaks, recall = report["leaks"], report["recall_candidates"]
    print(f"\n== audit: {report['corpus']} ({report['format']}, {report['corpus_paragraphs']} paragraphs, "
          f"{report['paragraphs_without_entity']} without a valid entity removed by the filter; "
          f"{report['documents']} documents of {report['paragraphs_per_document']} paragraphs) ==")  # fmt: skip
    print("leak = any form equal to the answer under the metrics' normalisation (+accents, plurals, possessives)")
    print(f"leak rate, chosen answers ({leaks['documents']} documents): reference rule "
          f"{leaks['reference_leak_rate_chosen']:.1%}, previous memtrain policy {leaks['previous_leak_rate_chosen']:.1%}, "
          f"ours {leaks['ours_leak_rate_chosen']:.1%}")  # fmt: skip
    print(f"leak rate, all {leaks['entity_pairs']} valid pivot entities: reference rule "
          f"{leaks['reference_leak_rate_all_entities']:.1%}, previous policy {leaks['previous_leak_rate_all_entities']:.1%}, "
          f"ours {leaks['ours_leak_rate_all_entities']:.1%} (ours drops {leaks['ours_dropped_rate_all_entities']:.1%}: "
          f"{leaks['ours_dropped_by_guard_all_entities']})")  # fmt: skip
    print(f"entities dropped by each guard while building: {report['builder_entities_dropped']}; pivots with every "
          f"entity dropped: {report['pivots_all_entities_dropped']}")  # fmt: skip
    print(f"recall candidates in {recall['chunks']} chunks of {recall['chunk_size']} tokens ({recall['documents']} "
          f"documents): {recall.get('candidates', 0)}, rejected as template text {recall.get('template_text', 0)}, "
          f"as cut by a chunk edge {recall.get('chunk_edge', 0)}")  # fmt: skip


def synthetic_corpus(paragraphs, size: int, seed: int = 0) -> list[str]:
    """``size`` paragraphs of real sentences, resampled with the corpus' paragraph-length distribution."""
    rng = np.random.default_rng(seed)
    sentences = [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p["text"]) if s]
    lengths = np.array([len(p["text"].split()) for p in paragraphs])
    out = []
    for target in rng.choice(lengths, size=size):
        words: list[str] = []
        while len(words) < target:
            words.extend(sentences[rng.integers(len(sentences))].split())
        out.append(" ".join(words))
    return out


def run_method(method: str, num_documents: int, embedding_model: str) -> dict:
    from memtrain.data.documents import DocumentBuilderConfig, build_documents
    from memtrain.data.entities import EntityExtractor
    from memtrain.models import load_tokenizer

    corpus = _corpus()
    tokenizer = load_tokenizer("smollm2-135m")
    extractor = EntityExtractor()
    config = DocumentBuilderConfig(
        num_documents=num_documents,
        num_neighbours=29,
        num_random=120,
        neighbour_method=method,
        embedding_model=embedding_model if method == "dense" else None,
        tokenizer_name_or_path="smollm2-135m",
        show_progress=False,
    )
    start = time.perf_counter()
    result = build_documents(corpus.paragraphs, config, extractor=extractor, tokenizer=tokenizer)
    total = time.perf_counter() - start
    stats = result.stats
    per_doc = (total - stats.seconds["index"]) / stats.built
    report = {
        "method": method,
        "corpus_paragraphs": len(corpus),
        "documents": stats.built,
        "seconds_total": round(total, 2),
        "seconds": stats.seconds,
        "paragraphs_without_entity": stats.paragraphs_without_entity,
        "documents_per_minute_incl_index": round(60 * stats.built / total, 1),
        "documents_per_minute_after_index": round(60 / per_doc, 1),
        "tokens_mean": stats.tokens_mean,
        "pivots_tried": stats.pivots_tried,
        "entities_dropped": stats.entities_dropped,
        "peak_rss_mb": round(_peak_mb(), 1),
        "leaks": leak_comparison(result.rows, corpus.paragraphs, extractor),
    }
    if method == "bm25":
        touched = len({pid for row in result.rows for pid in row["paragraph_ids"]})
        report["paper_scale"] = extrapolate_bm25(corpus, stats, tokenizer, touched)
        report["peak_rss_mb_with_300k_index"] = round(_peak_mb(), 1)
    return report


def extrapolate_bm25(corpus, stats, tokenizer, touched: int) -> dict:
    """Paper-scale minutes = 300k index + tokenizing and NER of 300k paragraphs once + 30k x (retrieval + assembly)."""
    from memtrain.data.neighbours import build_index

    texts = synthetic_corpus(corpus.paragraphs, PAPER_PARAGRAPHS)
    start = time.perf_counter()
    index = build_index(texts, "bm25")
    index_seconds = time.perf_counter() - start
    queries = list(range(0, PAPER_PARAGRAPHS, PAPER_PARAGRAPHS // 300))[:300]
    start = time.perf_counter()
    index.neighbours_of(queries, 29)
    per_query = (time.perf_counter() - start) / len(queries)
    start = time.perf_counter()
    tokenizer(texts[:5000], add_special_tokens=False)
    per_paragraph = (time.perf_counter() - start) / 5000
    tokenize_all = per_paragraph * PAPER_PARAGRAPHS
    built = stats.built
    # NER runs once over the whole corpus (the entity filter), so it scales with paragraphs, not documents
    ner_per_paragraph = stats.seconds.get("ner_corpus", 0.0) / max(stats.corpus_paragraphs, 1)
    ner_all = ner_per_paragraph * PAPER_PARAGRAPHS
    # the measured assembly includes filling the token-count cache for the `touched` paragraphs: counted above
    assemble_per_doc = max(stats.seconds["assemble"] - per_paragraph * touched, 0.0) / built
    total = index_seconds + tokenize_all + ner_all + PAPER_DOCUMENTS * (per_query + assemble_per_doc)
    return {
        "index_300k_seconds": round(index_seconds, 1),
        "retrieval_seconds_per_pivot_300k": round(per_query, 4),
        "ner_300k_paragraphs_seconds": round(ner_all, 1),
        "assemble_seconds_per_document": round(assemble_per_doc, 4),
        "tokenize_300k_paragraphs_seconds": round(tokenize_all, 1),
        "extrapolated_minutes_30k_documents": round(total / 60, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["bm25", "dense"], choices=["bm25", "dense"])
    parser.add_argument("--num_documents", type=int, default=100)
    parser.add_argument("--embedding_model", default="minilm")
    parser.add_argument("--json", help="also write the reports to this file")
    parser.add_argument("--audit_only", action="store_true", help="only the leak / guard / recall audit")
    parser.add_argument("--skip_audit", action="store_true", help="only the timing runs")
    parser.add_argument("--audit_documents", type=int, default=50, help="documents built per audited corpus")
    parser.add_argument("--recall_documents", type=int, default=10, help="of which chunked for recall candidates")
    parser.add_argument("--chunk_size", type=int, default=500, help="tokens per chunk for the recall audit")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(run_method(args._one, args.num_documents, args.embedding_model)))
        return
    reports = []
    for source, label in [] if args.skip_audit else AUDIT_CORPORA():
        report = audit(source, label, args)
        reports.append(report)
        print_audit(report)
    for method in [] if args.audit_only else args.methods:
        command = [sys.executable, __file__, "--_one", method, "--num_documents", str(args.num_documents)]
        command += ["--embedding_model", args.embedding_model]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        report = json.loads(out.strip().splitlines()[-1])
        reports.append(report)
        print(f"\n== {method} ({report['corpus_paragraphs']} paragraphs, {report['documents']} documents of 150 "
              f"paragraphs, mean {report['tokens_mean']} SmolLM2 tokens) ==")  # fmt: skip
        print(f"documents/minute: {report['documents_per_minute_after_index']} after indexing, "
              f"{report['documents_per_minute_incl_index']} including it; seconds {report['seconds']}")  # fmt: skip
        print(f"peak memory: {report['peak_rss_mb']} MB")
        leaks = report["leaks"]
        print(f"leak rate (normalised definition), chosen answers: reference rule "
              f"{leaks['reference_leak_rate_chosen']:.1%}, ours {leaks['ours_leak_rate_chosen']:.1%}; over all "
              f"{leaks['entity_pairs']} valid pivot entities: reference {leaks['reference_leak_rate_all_entities']:.1%}, "
              f"ours {leaks['ours_leak_rate_all_entities']:.1%} (policy drops {leaks['ours_dropped_rate_all_entities']:.1%})")  # fmt: skip
        if "paper_scale" in report:
            scale = report["paper_scale"]
            print(f"paper scale (30k documents, 300k paragraphs, bm25): ~{scale['extrapolated_minutes_30k_documents']} "
                  f"min on this machine; {scale}; peak memory with the 300k index "
                  f"{report['peak_rss_mb_with_300k_index']} MB")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
