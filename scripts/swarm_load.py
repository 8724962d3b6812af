"""Bounded client load on the gateway while an orchestrator replaces, scales or restarts tasks.

``python -m scripts.swarm_load --target 127.0.0.1:PORT --photo A.jpg --stop-file F --out R.json``
runs ``--workers`` closed-loop clients, each on its own channel (its own TCP connection, so the
routing mesh spreads them over the gateway tasks), alternating SearchByImage (embedder and every
indexer shard) and SimilarListings of a listing that search returned (catalogue and shards). A
call that fails with UNAVAILABLE is retried once, as a gRPC retry policy with two attempts would
(`RETRY_BACKOFF_S` later, waiting for the channel to reconnect); any other error, or a second
failure, counts as failed. It stops when the stop file appears, after ``--max-seconds`` or after
``--max-requests`` calls, and writes sent / failed / retried counts and latencies as JSON.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc

RETRY_BACKOFF_S = 0.2
CALL_TIMEOUT_S = 10.0


@dataclass
class Tally:
    """What the workers did, shared under a lock."""

    sent: int = 0
    failed: int = 0
    retried: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, ok: bool, retried: bool, latency_ms: float, error: str | None) -> None:
        with self.lock:
            self.sent += 1
            self.retried += retried
            if ok:
                self.latencies_ms.append(latency_ms)
            else:
                self.failed += 1
                self.errors[error] += 1

    def summary(self, seconds: float) -> dict:
        ordered = sorted(self.latencies_ms)
        pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else None
        return {"sent": self.sent, "failed": self.failed, "retried": self.retried,
                "errors": dict(self.errors), "seconds": round(seconds, 1),
                "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": round(ordered[-1], 1) if ordered else None}


def call_with_one_retry(method, request) -> tuple[object | None, bool, str | None]:
    """(response or None, whether it was retried, error code name or None)."""
    try:
        return method(request, timeout=CALL_TIMEOUT_S), False, None
    except grpc.RpcError as first:
        if first.code() != grpc.StatusCode.UNAVAILABLE:
            return None, False, first.code().name
    time.sleep(RETRY_BACKOFF_S)
    try:
        return method(request, timeout=CALL_TIMEOUT_S, wait_for_ready=True), True, None
    except grpc.RpcError as second:
        return None, True, second.code().name


def worker(target: str, photos: list[bytes], tally: Tally, stop: threading.Event,
           max_requests: int, seed: int) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        listing_id = None
        turn = seed
        while not stop.is_set():
            with tally.lock:
                if tally.sent >= max_requests:
                    stop.set()
                    break
            turn += 1
            if listing_id is None or turn % 2:
                method = stub.SearchByImage
                request = gateway_pb2.SearchByImageRequest(image=photos[turn % len(photos)], k=5)
            else:
                method = stub.SimilarListings
                request = gateway_pb2.SimilarListingsRequest(listing_id=listing_id, k=5)
            started = time.perf_counter()
            response, retried, error = call_with_one_retry(method, request)
            tally.record(response is not None, retried, (time.perf_counter() - started) * 1000, error)
            if response is not None and response.results:
                listing_id = response.results[turn % len(response.results)].listing.id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.swarm_load", description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True, help="gateway host:port")
    parser.add_argument("--photo", action="append", required=True, type=Path, help="query photo (repeatable)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--stop-file", type=Path, required=True)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    photos = [path.read_bytes() for path in args.photo]
    tally, stop = Tally(), threading.Event()
    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(args.target, photos, tally, stop, args.max_requests, i),
                                daemon=True) for i in range(args.workers)]
    for thread in threads:
        thread.start()
    while not stop.is_set() and not args.stop_file.exists() and time.monotonic() - started < args.max_seconds:
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(timeout=2 * CALL_TIMEOUT_S + 1)
    summary = tally.summary(time.monotonic() - started)
    args.out.write_text(json.dumps(summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
