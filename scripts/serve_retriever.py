"""Serve a passage corpus for the search agent: POST /retrieve {"queries": [...], "topk": 3}.

    python scripts/serve_retriever.py --corpus wiki-18.jsonl --port 8000 [--method dense --embedding_model minilm]
    python scripts/serve_retriever.py serve.yaml --port 8001   # settings from a YAML file, the command line wins

Training processes then use ``memtrain.retrieval.RemoteRetriever("http://127.0.0.1:8000")`` (it retries resets with
backoff and splits batches). Each request is bounded: ``--max_queries`` (512) queries, ``--max_body_bytes`` (1 MiB),
``topk`` <= 100, and ``--client_timeout`` (10 s) to send it; over a bound the answer is a 4xx naming the fix.
"""

import sys

from memtrain.cli import run_script
from memtrain.retrieval import main  # noqa: F401  (the entry point, importable from the script)


if __name__ == "__main__":
    sys.exit(run_script("serve-retriever"))
