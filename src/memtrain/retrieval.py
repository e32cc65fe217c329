"""The search tool of the MEM1-style agent: a passage retriever, in-process or behind a small local HTTP service.

The index is built with :func:`memtrain.data.neighbours.build_index` (BM25 by default, dense optional), over
``"title"\\ntext`` strings like FlashRAG's ``contents``. One service can hold the index for every training process
(``memtrain-serve-retriever`` / ``scripts/serve_retriever.py``); :class:`RemoteRetriever` is its client with the same
``search`` interface. The wire format follows Search-R1's retriever: ``POST /retrieve`` with
``{"queries": [...], "topk": k}`` answers ``{"result": [[passage, ...], ...]}`` (with ``"return_scores": true``,
each item is ``{"document": passage, "score": s}`` as Search-R1's clients expect).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

MAX_TOPK = 100


@dataclass
class Passage:
    """One retrieved passage; ``contents`` renders it the FlashRAG/DPR way."""

    id: str
    title: str
    text: str
    score: float = 0.0

    @property
    def contents(self) -> str:
        return f'"{self.title}"\n{self.text}' if self.title else self.text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "contents": self.contents}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Passage:
        if "document" in data:  # Search-R1's return_scores layout
            return cls.from_dict({**data["document"], "score": data.get("score", 0.0)})
        if "title" in data and "text" in data:
            title, text = str(data["title"]), str(data["text"])
        elif "contents" in data:
            title, text = split_contents(str(data["contents"]))
        else:
            raise ValueError(f"a passage needs `title`+`text` or `contents`, got keys {sorted(data)}.")
        return cls(str(data.get("id", "")), title, text, float(data.get("score", 0.0)))


def split_contents(contents: str) -> tuple[str, str]:
    """FlashRAG/DPR ``contents`` = ``"Title"\\ntext`` -> (title, text), for Search-R1 servers' replies that carry
    only ``contents``; no quoted first line -> ("", contents)."""
    first, sep, rest = contents.partition("\n")
    if sep and len(first) >= 2 and first.startswith('"') and first.endswith('"'):
        return first[1:-1], rest
    return "", contents


def load_passages(
    source: str | Path, format: str | None = None, limit: int | None = None, **kwargs: Any
) -> list[Passage]:
    """Passages of any corpus :func:`memtrain.data.corpus.load_corpus` reads (FlashRAG/DPR ``contents`` jsonl,
    ``{title, text}`` files, Hub datasets, ...). Unlike MemTrain's paragraph corpus, short passages are kept
    (``min_words=1``): a search corpus should return what it holds. ``kwargs`` go to ``load_corpus``.
    """
    from memtrain.data.corpus import load_corpus

    kwargs.setdefault("min_words", 1)
    loaded = load_corpus(str(source), format=format, limit=limit, **kwargs)
    return [Passage(str(p["id"]), str(p.get("title", "")), str(p["text"])) for p in loaded]


class Retriever:
    """Top-k passages for a batch of queries; thread-safe (the HTTP service calls it from several threads)."""

    def __init__(
        self,
        passages: Iterable[Passage | Mapping[str, Any]],
        method: str = "bm25",
        embedding_model: str | None = None,
    ):
        from memtrain.data.neighbours import build_index

        self.passages = [p if isinstance(p, Passage) else Passage.from_dict(p) for p in passages]
        if not self.passages:
            raise ValueError("the retriever needs at least one passage (the corpus is empty).")
        self.method = method
        if method not in ("bm25", "dense"):
            raise ValueError(f"Unknown retrieval method {method!r}; use 'bm25' or 'dense'.")
        self.index = build_index([p.contents for p in self.passages], method, embedding_model=embedding_model)
        self._lock = threading.Lock()

    @classmethod
    def from_corpus(
        cls,
        source: str | Path,
        format: str | None = None,
        method: str = "bm25",
        embedding_model: str | None = None,
        limit: int | None = None,
    ) -> Retriever:
        return cls(load_passages(source, format, limit), method=method, embedding_model=embedding_model)

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        """For each query, its ``k`` best passages, best first, with scores; fewer when the corpus is smaller or (BM25)
        when fewer passages share a word with the query, so an unmatched query returns nothing rather than noise."""
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query in a list.")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        if not queries:
            return []
        k = min(k, len(self.passages))
        with self._lock:
            scores, indices = self.index.search(list(queries), k)
        results = []
        for row_scores, row_indices in zip(scores, indices, strict=True):
            hits = []
            for score, index in zip(row_scores, row_indices, strict=True):
                if int(index) < 0 or (self.method == "bm25" and score <= 0):
                    continue  # faiss pads missing neighbours with -1; a BM25 score of 0 shares no query word
                p = self.passages[int(index)]
                hits.append(Passage(p.id, p.title, p.text, float(score)))
            results.append(hits)
        return results


# ---------------------------------------------------------------------------------------------------------------------
# HTTP service
# ---------------------------------------------------------------------------------------------------------------------


class _RetrieveHandler(BaseHTTPRequestHandler):
    server: RetrievalServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") != "/health":
            self._reply(404, {"error": f"unknown path {self.path}; use POST /retrieve or GET /health."})
            return
        self._reply(200, {"status": "ok", "num_passages": len(self.server.retriever)})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/retrieve":
            self._reply(404, {"error": f"unknown path {self.path}; use POST /retrieve."})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(length) or b"null")
            queries, topk, with_scores = _parse_request(request, self.server.default_topk)
        except (ValueError, TypeError) as error:
            self._reply(400, {"error": str(error)})
            return
        results = self.server.retriever.search(queries, topk)
        if with_scores:
            payload = [[{"document": p.to_dict(), "score": p.score} for p in hits] for hits in results]
        else:
            payload = [[p.to_dict() for p in hits] for hits in results]
        self._reply(200, {"result": payload})

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("retriever %s - " + format, self.address_string(), *args)


def _parse_request(request: Any, default_topk: int) -> tuple[list[str], int, bool]:
    if not isinstance(request, Mapping) or "queries" not in request:
        raise ValueError('the request body must be JSON like {"queries": ["..."], "topk": 3}.')
    queries = request["queries"]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ValueError('"queries" must be a list of strings.')
    topk = request.get("topk", default_topk)
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= MAX_TOPK:
        raise ValueError(f'"topk" must be an integer in [1, {MAX_TOPK}], got {topk!r}.')
    return queries, topk, bool(request.get("return_scores", False))


class RetrievalServer(ThreadingHTTPServer):
    """A :class:`Retriever` behind ``POST /retrieve``; ``port=0`` picks a free port (read it from ``.url``)."""

    daemon_threads = True

    def __init__(self, retriever: Retriever, host: str = "127.0.0.1", port: int = 8000, default_topk: int = 3):
        self.retriever = retriever
        self.default_topk = default_topk
        super().__init__((host, port), _RetrieveHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start_background(self) -> threading.Thread:
        """Serve from a daemon thread (tests, or one trainer process hosting the index for the others)."""
        thread = threading.Thread(target=self.serve_forever, name="memtrain-retriever", daemon=True)
        thread.start()
        return thread


class RemoteRetriever:
    """Client of a :class:`RetrievalServer` (or Search-R1's retriever): the same ``search`` as :class:`Retriever`."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/retrieve"):
            self.url += "/retrieve"
        self.timeout = timeout

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query in a list.")
        if not queries:
            return []
        body = json.dumps({"queries": list(queries), "topk": k, "return_scores": True}).encode("utf-8")
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]
            except (ValueError, KeyError, TypeError):
                pass
            raise RuntimeError(f"the retriever at {self.url} answered {error.code}: {detail}") from error
        except urllib.error.URLError as error:
            raise ConnectionError(
                f"cannot reach the retriever at {self.url} ({error.reason}); start it with "
                "`python scripts/serve_retriever.py --corpus <file>`."
            ) from error
        results = payload.get("result")
        if not isinstance(results, list) or len(results) != len(queries):
            raise RuntimeError(
                f"the retriever at {self.url} returned {str(payload)[:200]!r} for {len(queries)} queries."
            )
        return [[Passage.from_dict(item) for item in hits] for hits in results]


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a corpus: ``python scripts/serve_retriever.py --corpus wiki.jsonl --port 8000``."""
    parser = argparse.ArgumentParser(description="Serve a passage corpus for the search agent (POST /retrieve).")
    parser.add_argument("--corpus", required=True, help="FlashRAG/DPR contents jsonl, or any load_corpus source")
    parser.add_argument("--format", default=None, help="corpus format for load_corpus (default: guessed)")
    parser.add_argument("--method", default="bm25", choices=["bm25", "dense"])
    parser.add_argument("--embedding_model", default=None, help="sentence-transformers model for --method dense")
    parser.add_argument("--limit", type=int, default=None, help="read only the first N passages")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--topk", type=int, default=3, help="default top-k when a request gives none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    retriever = Retriever.from_corpus(args.corpus, args.format, args.method, args.embedding_model, args.limit)
    server = RetrievalServer(retriever, args.host, args.port, args.topk)
    logger.info("serving %d passages (%s) at %s/retrieve", len(retriever), args.method, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
