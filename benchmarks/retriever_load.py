"""The retriever service under load (issue 14): a real server process on 127.0.0.1, real BM25, real corpus.

    python benchmarks/retriever_load.py [--corpus tests/fixtures/search/dpr_passages_200.jsonl --clients 200]

Prints, all measured in the same run against one ``scripts/serve_retriever.py`` process:
- the single-client baseline: p50/p95 latency of one-query requests (top-3) sent one after another;
- ``--clients`` concurrent clients (each one request, released together by a barrier): how many were answered
  correctly (same top-3 ids as the in-process retriever), p50/p95, as ratios to the baseline;
- the issue's oversized request (700k queries x topk 100, 10.5 MB): how fast it is refused, and the p50/p95 of
  normal requests sent while it is in flight (ratio to the baseline);
- the largest request the server accepts (``max_queries`` x topk 100): its time, and normal requests beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO / "tests" / "fixtures" / "search" / "dpr_passages_200.jsonl"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, bytes]:
    request = urllib.request.Request(url + "/retrieve", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def start_server(corpus: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    script = str(REPO / "scripts" / "serve_retriever.py")
    process = subprocess.Popen(
        [sys.executable, script, "--corpus", str(corpus), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            return process, url
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"the retriever did not start on {url}") from None
            time.sleep(0.3)


def timed_normal_requests(remote, queries: list[str], stop: threading.Event, out: list[float]) -> None:
    i = 0
    while not stop.is_set():
        start = time.perf_counter()
        remote.search([queries[i % len(queries)]], k=3)
        out.append(time.perf_counter() - start)
        i += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--baseline", type=int, default=100, help="sequential requests for the baseline")
    args = parser.parse_args()

    from memtrain.retrieval import MAX_QUERIES, MAX_TOPK, RemoteRetriever, Retriever, load_passages

    passages = load_passages(args.corpus)
    retriever = Retriever(passages)
    queries = []
    for p in passages[::3]:
        words = p.text.split()
        queries.append(" ".join(words[len(words) // 2 - 6 : len(words) // 2 + 6]))
    expected = [[p.id for p in hits] for hits in retriever.search(queries, k=3)]
    process, url = start_server(args.corpus)
    remote = RemoteRetriever(url, timeout=120)
    try:
        print(f"retriever load on {url}: {len(passages)} passages (BM25), server in its own process")
        for q in queries[:20]:  # warm-up
            remote.search([q], k=3)
        base = []
        for i in range(args.baseline):
            start = time.perf_counter()
            remote.search([queries[i % len(queries)]], k=3)
            base.append(time.perf_counter() - start)
        b50, b95 = percentile(base, 0.5), percentile(base, 0.95)
        print(f"  single client ({args.baseline} requests): p50 {b50 * 1e3:.2f} ms, p95 {b95 * 1e3:.2f} ms")

        latencies: list[float] = []
        correct, errors = [0], []
        barrier = threading.Barrier(args.clients)
        lock = threading.Lock()

        def client(i: int) -> None:
            barrier.wait(timeout=60)
            start = time.perf_counter()
            try:
                hits = RemoteRetriever(url, timeout=120).search([queries[i % len(queries)]], k=3)[0]
            except Exception as error:  # noqa: BLE001 (counted and printed)
                errors.append(repr(error))
                return
            with lock:
                latencies.append(time.perf_counter() - start)
                correct[0] += [p.id for p in hits] == expected[i % len(queries)]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        wall = time.perf_counter() - start
        c50, c95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
        print(
            f"  {args.clients} concurrent clients: {correct[0]}/{args.clients} answered correctly, {len(errors)} errors, "
            f"all done in {wall:.2f} s; p50 {c50 * 1e3:.1f} ms ({c50 / b50:.1f}x baseline), "
            f"p95 {c95 * 1e3:.1f} ms ({c95 / b95:.1f}x baseline p95)"
        )
        for error in errors[:3]:
            print(f"    error: {error}")

        for label, body in (
            ("oversized request (700k queries x topk 100)", {"queries": ["who founded the company"] * 700_000}),
            (f"largest accepted request ({MAX_QUERIES} queries x topk {MAX_TOPK})", {"queries": queries * 10}),
        ):
            body["queries"] = body["queries"][: 700_000 if "oversized" in label else MAX_QUERIES]
            data = json.dumps({**body, "topk": MAX_TOPK}).encode()
            stop, beside = threading.Event(), []
            normal = threading.Thread(target=timed_normal_requests, args=(remote, queries, stop, beside))
            normal.start()
            time.sleep(0.2)
            start = time.perf_counter()
            status, reply = post(url, data)
            seconds = time.perf_counter() - start
            time.sleep(0.2)
            stop.set()
            normal.join(timeout=60)
            n50, n95 = percentile(beside, 0.5), percentile(beside, 0.95)
            print(
                f"  {label}, {len(data) / 1e6:.1f} MB: HTTP {status} in {seconds:.3f} s, reply {len(reply) / 1e6:.2f} MB; "
                f"{len(beside)} normal requests beside it: p50 {n50 * 1e3:.2f} ms ({n50 / b50:.1f}x), "
                f"p95 {n95 * 1e3:.2f} ms ({n95 / b95:.1f}x)"
            )
            if status != 200:
                print(f"    {json.loads(reply)['error']}")
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
