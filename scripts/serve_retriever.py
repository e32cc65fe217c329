"""Serve a passage corpus for the search agent: POST /retrieve {"queries": [...], "topk": 3}.

    python scripts/serve_retriever.py --corpus wiki-18.jsonl --port 8000 [--method dense --embedding_model minilm]

Training processes then use ``memtrain.retrieval.RemoteRetriever("http://127.0.0.1:8000")``.
"""

from memtrain.retrieval import main


if __name__ == "__main__":
    main()
