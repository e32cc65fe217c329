"""The search tool of the MEM1-style agent: a passage retriever, in-process or behind a small local HTTP service.

The index is built with :func:`memtrain.data.neighbours.build_index` (BM25 by default, dense optional), over
``"title"\\ntext`` strings like FlashRAG's ``contents``. One service can hold the index for every training process
(``memtrain-serve-retriever`` / ``scripts/serve_retriever.py``); :class:`RemoteRetriever` is its client with the same
``search`` interface. The wire format follows Search-R1's retriever: ``POST /retrieve`` with
``{"queries": [...], "topk": k}`` answers ``{"result": [[passage, ...], ...]}`` (with ``"return_scores": true``,
each item is ``{"document": passage, "score": s}`` as Search-R1's clients expect).

Under load (issue 14) the service bounds what one request may cost: the body size (413 before any JSON is parsed),
the queries per request (413) and ``topk`` (400); a client slower than ``client_timeout`` gets 408 instead of holding a
thread forever; the listen backlog holds 1024 pending connections; a big request searches in chunks so it cannot hold
the index for the others. :class:`RemoteRetriever` retries resets, refusals and 5xx with backoff (queries are
idempotent), never a 4xx, and splits large batches under the server's per-request limit.
"""

from __future__ import annotations

import http.client
import json
import logging
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from memtrain.configs import SearchAgentArguments


logger = logging.getLogger(__name__)

MAX_TOPK = 100
MAX_QUERIES = 512  # per request; RemoteRetriever sends at most DEFAULT_CLIENT_BATCH, under it
MAX_BODY_BYTES = 1 << 20  # 512 queries of ~2 KB: a request over 1 MiB is a mistake, not a batch
CLIENT_TIMEOUT = 10.0  # seconds a client may take to send its request
DRAIN_LIMIT = 64 << 20  # an oversized body up to this is read and dropped so the client sees the 413, not a reset
SEARCH_CHUNK = 64  # queries per hold of the index lock: a big request cannot starve the others
DEFAULT_CLIENT_BATCH = 256


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
        queries = list(queries)
        rows = []
        for start in range(0, len(queries), SEARCH_CHUNK):  # the lock is released between chunks (fair under load)
            with self._lock:
                scores, indices = self.index.search(queries[start : start + SEARCH_CHUNK], k)
            rows.extend(zip(scores, indices, strict=True))
        results = []
        for row_scores, row_indices in rows:
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


class _RequestError(Exception):
    """A request the service refuses: HTTP ``status`` and a one-line message naming the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _RetrieveHandler(BaseHTTPRequestHandler):
    server: RetrievalServer

    def setup(self) -> None:
        # StreamRequestHandler puts it on the socket: no thread waits forever for a slow or lying client
        self.timeout = self.server.client_timeout
        super().setup()

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
            queries, topk, with_scores = _parse_request(json.loads(self._read_body()), self.server)
        except _RequestError as error:
            self._reply(error.status, {"error": str(error)})
            return
        except (ValueError, TypeError) as error:
            self._reply(400, {"error": str(error)})
            return
        results = self.server.retriever.search(queries, topk)
        if with_scores:
            payload = [[{"document": p.to_dict(), "score": p.score} for p in hits] for hits in results]
        else:
            payload = [[p.to_dict() for p in hits] for hits in results]
        self._reply(200, {"result": payload})

    def _read_body(self) -> bytes:
        """The body, bounded by ``max_body_bytes`` (checked on Content-Length, before reading) and ``client_timeout``."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise _RequestError(400, "the Content-Length header is not an integer.") from None
        if length < 0:
            raise _RequestError(400, f"the Content-Length header is negative ({length}).")
        limit = self.server.max_body_bytes
        if length > limit:
            self.close_connection = True
            self._drain(length)
            raise _RequestError(
                413,
                f"request body of {length} bytes exceeds the retriever's limit of {limit}; send fewer queries per "
                f"request (at most {self.server.max_queries}) or restart the server with a larger --max_body_bytes.",
            )
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            body = b""
        if len(body) < length:
            self.close_connection = True
            raise _RequestError(
                408,
                f"the client sent fewer bytes than its Content-Length ({len(body)} of {length}) within "
                f"{self.server.client_timeout:g} s; send the whole body, or fix the Content-Length header.",
            )
        return body or b"null"

    def _drain(self, length: int) -> None:
        """Read and drop an oversized body (up to DRAIN_LIMIT, within the client timeout), without parsing it: closing
        on unread bytes resets the connection, and the client would see a reset instead of the 413."""
        left = length if length <= DRAIN_LIMIT else 0
        try:
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except (TimeoutError, OSError):
            pass

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("retriever %s - " + format, self.address_string(), *args)


def _parse_request(request: Any, server: RetrievalServer) -> tuple[list[str], int, bool]:
    if not isinstance(request, Mapping) or "queries" not in request:
        raise ValueError('the request body must be JSON like {"queries": ["..."], "topk": 3}.')
    queries = request["queries"]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ValueError('"queries" must be a list of strings.')
    if len(queries) > server.max_queries:
        raise _RequestError(
            413,
            f"{len(queries)} queries in one request; the retriever takes at most {server.max_queries} queries per "
            "request: split the batch (RemoteRetriever does) or restart the server with a larger --max_queries.",
        )
    topk = request.get("topk", server.default_topk)
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= MAX_TOPK:
        raise ValueError(f'"topk" must be an integer in [1, {MAX_TOPK}], got {topk!r}.')
    return queries, topk, bool(request.get("return_scores", False))


class RetrievalServer(ThreadingHTTPServer):
    """A :class:`Retriever` behind ``POST /retrieve``; ``port=0`` picks a free port (read it from ``.url``).

    Each request is bounded (``max_body_bytes``, ``max_queries``, ``topk <= MAX_TOPK``) and each client has
    ``client_timeout`` seconds to send it; the backlog (``request_queue_size``) holds a multi-GPU run's burst."""

    daemon_threads = True
    request_queue_size = 1024  # socketserver's 5 reset 39 of 200 concurrent connections; Linux caps it at somaxconn

    def __init__(
        self,
        retriever: Retriever,
        host: str = "127.0.0.1",
        port: int = 8000,
        default_topk: int = 3,
        max_queries: int = MAX_QUERIES,
        max_body_bytes: int = MAX_BODY_BYTES,
        client_timeout: float = CLIENT_TIMEOUT,
    ):
        if not isinstance(default_topk, int) or not 1 <= default_topk <= MAX_TOPK:
            raise ValueError(f"default_topk must be in [1, {MAX_TOPK}], got {default_topk!r}.")
        if max_queries < 1 or max_body_bytes < 1 or client_timeout <= 0:
            raise ValueError(
                f"max_queries, max_body_bytes and client_timeout must be positive, got {max_queries}, "
                f"{max_body_bytes}, {client_timeout}."
            )
        self.retriever = retriever
        self.default_topk = default_topk
        self.max_queries = max_queries
        self.max_body_bytes = max_body_bytes
        self.client_timeout = client_timeout
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
    """Client of a :class:`RetrievalServer` (or Search-R1's retriever): the same ``search`` as :class:`Retriever`.

    A reset, refused or timed-out connection and a 5xx are retried ``max_attempts`` times in all, waiting
    ``backoff * 2**attempt`` seconds (queries are idempotent; one reset must not crash a multi-GPU run); a 4xx is the
    request's fault and is raised at once. Batches over ``max_queries_per_request`` are split."""

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        max_attempts: int = 4,
        backoff: float = 0.5,
        max_queries_per_request: int = DEFAULT_CLIENT_BATCH,
    ):
        self.url = url.rstrip("/")
        if not self.url.endswith("/retrieve"):
            self.url += "/retrieve"
        if max_attempts < 1 or max_queries_per_request < 1 or backoff < 0:
            raise ValueError(
                f"max_attempts and max_queries_per_request must be >= 1 and backoff >= 0, got {max_attempts}, "
                f"{max_queries_per_request}, {backoff}."
            )
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_queries_per_request = max_queries_per_request

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query in a list.")
        queries = list(queries)
        results: list[list[Passage]] = []
        for start in range(0, len(queries), self.max_queries_per_request):
            results.extend(self._search_batch(queries[start : start + self.max_queries_per_request], k))
        return results

    def _search_batch(self, queries: list[str], k: int) -> list[list[Passage]]:
        body = json.dumps({"queries": queries, "topk": k, "return_scores": True}).encode("utf-8")
        reason = ""
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                payload = self._post_once(body)
                break
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")
                try:
                    detail = json.loads(detail)["error"]
                except (ValueError, KeyError, TypeError):
                    pass
                if error.code < 500:
                    raise RuntimeError(f"the retriever at {self.url} answered {error.code}: {detail}") from error
                reason = f"answered {error.code}: {detail}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
                reason = str(getattr(error, "reason", None) or error) or type(error).__name__
            logger.warning("retriever at %s: attempt %d/%d %s", self.url, attempt + 1, self.max_attempts, reason)
        else:
            raise ConnectionError(
                f"cannot reach the retriever at {self.url} after {self.max_attempts} attempts ({reason}); start it "
                "with `python scripts/serve_retriever.py --corpus <file>`, or allow more with "
                "RemoteRetriever(max_attempts=...)."
            )
        results = payload.get("result") if isinstance(payload, dict) else None
        if not isinstance(results, list) or len(results) != len(queries):
            raise RuntimeError(
                f"the retriever at {self.url} returned {str(payload)[:200]!r} for {len(queries)} queries."
            )
        return [[Passage.from_dict(item) for item in hits] for hits in results]

    def _post_once(self, body: bytes) -> Any:
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())


def build_retriever(args: SearchAgentArguments) -> Retriever | RemoteRetriever | None:
    """A client of the retriever service (an http URL) or an in-process index of the corpus; None without one."""
    if not args.retriever:
        return None
    if args.retriever.startswith(("http://", "https://")):
        return RemoteRetriever(args.retriever)
    return Retriever.from_corpus(args.retriever, method=args.retriever_method)


@dataclass
class RetrieverServerArguments:
    """``serve-retriever`` settings (``python scripts/serve_retriever.py [settings.yaml] --key value ...``)."""

    corpus: str | None = field(
        default=None, metadata={"help": "FlashRAG/DPR contents jsonl, or any memtrain.data.corpus.load_corpus source."}
    )
    format: str | None = field(default=None, metadata={"help": "Corpus format for load_corpus (default: guessed)."})
    method: str = field(default="bm25", metadata={"help": "Search method: bm25 or dense."})
    embedding_model: str | None = field(
        default=None, metadata={"help": "sentence-transformers model for method dense."}
    )
    limit: int | None = field(default=None, metadata={"help": "Read only the first N passages."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on (0: any free port)."})
    topk: int = field(default=3, metadata={"help": f"Passages per query when a request gives none (1 to {MAX_TOPK})."})
    max_queries: int = field(default=MAX_QUERIES, metadata={"help": "Queries per request (more: 413)."})
    max_body_bytes: int = field(default=MAX_BODY_BYTES, metadata={"help": "Request body bytes (more: 413)."})
    client_timeout: float = field(
        default=CLIENT_TIMEOUT, metadata={"help": "Seconds a client may take to send its request (then 408)."}
    )

    def __post_init__(self) -> None:
        """Checked before the (slow) index build: a bad default would fail every request."""
        if not self.corpus:
            raise ValueError("Give the passages to serve: --corpus wiki-18.jsonl (or a settings file with corpus:).")
        if self.method not in ("bm25", "dense"):
            raise ValueError(f"--method {self.method} is not a search method; pass --method bm25 or --method dense.")
        if not 1 <= self.topk <= MAX_TOPK:
            raise ValueError(
                f"--topk {self.topk} is out of range: a request may ask for 1 to {MAX_TOPK} passages; pass --topk "
                f"between 1 and {MAX_TOPK}."
            )
        for name in ("max_queries", "max_body_bytes", "client_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}.")
        if not 0 <= self.port <= 65535:
            raise ValueError(
                f"--port {self.port} is not a TCP port; pass --port between 1 and 65535 (0: any free one)."
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit} would serve no passages; pass --limit >= 1 or leave it out.")


def _check_address(host: str, port: int) -> None:
    """Bind the address once before the (slow) index build: a port in use or a host not of this machine fails now."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as error:
        raise ValueError(
            f"cannot listen on {host}:{port} ({error.strerror or error}); pass another --port (0: any free one) or "
            "--host."
        ) from None


def _refuse(message: str) -> None:
    """Bad settings: one line on stderr and exit status 2, as argparse does, with no traceback."""
    print(f"serve_retriever: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a corpus: ``python scripts/serve_retriever.py --corpus wiki.jsonl --port 8000`` (or a YAML file)."""
    from memtrain.configs import parse_recipe_args

    try:
        (args,) = parse_recipe_args(list(sys.argv[1:] if argv is None else argv), (RetrieverServerArguments,))
    except ValueError as error:
        _refuse(str(error))
    try:
        _check_address(args.host, args.port)
    except ValueError as error:
        _refuse(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    retriever = Retriever.from_corpus(args.corpus, args.format, args.method, args.embedding_model, args.limit)
    if args.topk > len(retriever):
        _refuse(
            f"--topk {args.topk} exceeds the corpus' {len(retriever)} passages; pass --topk <= {len(retriever)} "
            "(or a larger --limit / corpus)."
        )
    server = RetrievalServer(
        retriever, args.host, args.port, args.topk, args.max_queries, args.max_body_bytes, args.client_timeout
    )
    logger.info("serving %d passages (%s) at %s/retrieve", len(retriever), args.method, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
