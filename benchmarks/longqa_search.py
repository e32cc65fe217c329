"""Long-text QA lengths and build speed; retriever speed in-process and over the local HTTP service.

    python benchmarks/longqa_search.py
    python benchmarks/longqa_search.py --questions /work/shared/data/hipporag/data/hotpotqa_train.json

Long-text QA: builds every bucket that the question file's paragraph pool allows and prints the SmolLM2 token count
of the contexts (the paper quotes ~140 tokens per HotpotQA document: 28k at N = 200). Retrieval: BM25 index build
time over the built-in 6,119-passage Wikipedia sample, then queries/second for batches of 64 queries written from
the passages themselves (top-3, with top-1 accuracy), in-process and through RetrievalServer + RemoteRetriever.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_QUESTIONS = REPO / "tests" / "fixtures" / "longqa" / "hotpotqa_train_12.json"


def bench_longqa(path: Path, tokenizer) -> None:
    from memtrain.data.longqa import ParagraphPool, build_bucket, load_examples

    examples = load_examples(path)
    pool = ParagraphPool.from_examples(examples)
    largest = min(pool.available_for(e) + len(e.paragraphs) for e in examples)
    print(f"long-text QA: {len(examples)} questions, pool of {len(pool)} paragraphs (largest N: {largest})")
    for n in (50, 100, 200, 400, 800, 1600, 3200, 6400):
        if n > largest:
            break
        start = time.perf_counter()
        rows = build_bucket(examples, n, seed=0, pool=pool)
        seconds = time.perf_counter() - start
        tokens = [len(tokenizer(r["context"], add_special_tokens=False)["input_ids"]) for r in rows[:16]]
        print(
            f"  N={n:5d}: {len(rows) / seconds:8.0f} rows/s, context {statistics.mean(tokens):9.0f} tokens "
            f"({statistics.mean(tokens) / n:.0f} per document)"
        )


def bench_retrieval(num_batches: int) -> None:
    from memtrain.retrieval import RemoteRetriever, RetrievalServer, Retriever, load_passages

    passages = load_passages("builtin:wiki-sample")
    start = time.perf_counter()
    retriever = Retriever(passages)
    print(f"retrieval: BM25 index of {len(passages)} passages in {time.perf_counter() - start:.2f} s")
    queries, ids = [], []
    for p in passages[:: max(1, len(passages) // (64 * num_batches))][: 64 * num_batches]:
        words = p.text.split()
        queries.append(" ".join(words[len(words) // 2 - 5 : len(words) // 2 + 5]))
        ids.append(p.id)
    server = RetrievalServer(retriever, port=0)
    server.start_background()
    try:
        for name, backend in (("in-process", retriever), ("HTTP", RemoteRetriever(server.url))):
            start = time.perf_counter()
            hits = []
            for b in range(num_batches):
                hits += backend.search(queries[b * 64 : (b + 1) * 64], k=3)
            seconds = time.perf_counter() - start
            top1 = sum(h[0].id == i for h, i in zip(hits, ids) if h) / len(ids)
            print(f"  {name:10s}: {len(queries) / seconds:7.0f} queries/s (batches of 64, top-3), top-1 {top1:.2f}")
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS, help="HotpotQA/MuSiQue question file")
    parser.add_argument("--batches", type=int, default=8, help="query batches of 64 for the retrieval timing")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from memtrain.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    bench_longqa(args.questions, tokenizer)
    bench_retrieval(args.batches)


if __name__ == "__main__":
    main()
