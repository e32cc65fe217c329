"""How fast the MemTrain data pipeline is here, what the paper's scale would cost, and how often masking leaks.

    python benchmarks/data_build.py                      # both methods, 100 paper-size documents each
    python benchmarks/data_build.py --methods bm25 --num_documents 50

For each neighbour method (in its own process, so peak memory is per method) it builds paper-size documents
(1 pivot + 29 neighbours + 120 random = 150 paragraphs, SmolLM2 token counts) from the 6,119-passage 2Wiki corpus
and prints documents per minute. For bm25 it then indexes a 300k-paragraph corpus (sentences of the real corpus
resampled into paragraphs of the same length distribution: real vocabulary and posting-list sizes) and times
retrieval there, to extrapolate the paper's 30k documents from 300k paragraphs. Finally it compares the leak rate of
the reference implementation's masking (case-sensitive ``\\b`` regex) with ours on the same documents and entities.
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
PAPER_DOCUMENTS, PAPER_PARAGRAPHS = 30_000, 300_000


def _corpus():
    from memtrain.data.corpus import load_corpus

    source = str(SHARED_2WIKI) if SHARED_2WIKI.is_file() else "builtin:wiki-sample"
    return load_corpus(source)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference_mask(text: str, entity: str) -> str:
    """The reference code's rule: case-sensitive word-boundary regex."""
    return re.sub(r"\b" + re.escape(entity) + r"\b", "[MASK]", text)


def leak_comparison(rows, paragraphs, extractor) -> dict:
    from memtrain.data.entities import EntityLeakError, find_leaks, mask_entity_in_texts

    by_id = {p["id"]: p["text"] for p in paragraphs}
    pivots = [by_id[r["pivot_id"]] for r in rows]
    chosen_ref = chosen_ours = 0
    pairs = pair_ref = pair_ours = pair_dropped = 0
    for row, entities in zip(rows, extractor(pivots)):
        bodies = [by_id[pid] for pid in row["paragraph_ids"]]
        unmasked = "\n\n".join(f"Document {i + 1}:\n{b}" for i, b in enumerate(bodies))
        answer = row["answers"][0]
        chosen_ref += answer.lower() in reference_mask(unmasked, answer).lower()
        chosen_ours += answer.lower() in row["context"].lower() or bool(find_leaks(row["context"], answer))
        for entity in entities:  # every valid entity of the pivot: what a random pick could have been
            pairs += 1
            pair_ref += entity.text.lower() in reference_mask(unmasked, entity.text).lower()
            try:
                masked, _ = mask_entity_in_texts(bodies, entity.text)
            except EntityLeakError:
                pair_dropped += 1
                continue
            rendered = "\n\n".join(f"Document {i + 1}:\n{b}" for i, b in enumerate(masked))
            if find_leaks(rendered, entity.text):
                pair_dropped += 1  # the builder drops these too (entity inside a "Document i:" header)
                continue
            pair_ours += entity.text.lower() in rendered.lower()
    return {
        "documents": len(rows),
        "reference_leak_rate_chosen": chosen_ref / len(rows),
        "ours_leak_rate_chosen": chosen_ours / len(rows),
        "entity_pairs": pairs,
        "reference_leak_rate_all_entities": pair_ref / max(pairs, 1),
        "ours_leak_rate_all_entities": pair_ours / max(pairs, 1),
        "ours_dropped_rate_all_entities": pair_dropped / max(pairs, 1),
    }


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
    from memtrain.data.documents import DocumentBuilderConfig, build_documents, load_tokenizer
    from memtrain.data.entities import EntityExtractor

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
    """Paper-scale minutes = 300k index + tokenizing 300k paragraphs once + 30k x (NER + retrieval + assembly)."""
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
    ner_per_doc = stats.seconds["ner"] / built  # includes pivots without a usable entity
    # the measured assembly includes filling the token-count cache for the `touched` paragraphs: counted above
    assemble_per_doc = max(stats.seconds["assemble"] - per_paragraph * touched, 0.0) / built
    total = index_seconds + tokenize_all + PAPER_DOCUMENTS * (ner_per_doc + per_query + assemble_per_doc)
    return {
        "index_300k_seconds": round(index_seconds, 1),
        "retrieval_seconds_per_pivot_300k": round(per_query, 4),
        "ner_seconds_per_document": round(ner_per_doc, 4),
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
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(run_method(args._one, args.num_documents, args.embedding_model)))
        return
    reports = []
    for method in args.methods:
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
        print(f"leak rate, chosen answers: reference rule {leaks['reference_leak_rate_chosen']:.1%}, ours "
              f"{leaks['ours_leak_rate_chosen']:.1%}; over all {leaks['entity_pairs']} valid pivot entities: "
              f"reference {leaks['reference_leak_rate_all_entities']:.1%}, ours "
              f"{leaks['ours_leak_rate_all_entities']:.1%} (policy drops {leaks['ours_dropped_rate_all_entities']:.1%})")  # fmt: skip
        if "paper_scale" in report:
            scale = report["paper_scale"]
            print(f"paper scale (30k documents, 300k paragraphs, bm25): ~{scale['extrapolated_minutes_30k_documents']} "
                  f"min on this machine; {scale}; peak memory with the 300k index "
                  f"{report['peak_rss_mb_with_300k_index']} MB")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
