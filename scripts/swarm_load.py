"""Bounded client load on the gateway while an orchestrator replaces, scales or restarts tasks.

``python -m scripts.swarm_load --targets-file T --photo A.jpg --stop-file F --out R.json``
runs ``--workers`` closed-loop clients alternating SearchByImage (embedder and every indexer
shard) and SimilarListings of a listing that search returned (catalogue and shards). The
targets file lists the gateway addresses (host:port, one a line) and may change while the load
runs, as a load balancer's target list does: with the routing mesh it is the one published port
(each worker has its own channel, its own TCP connection, so the mesh spreads them over the
gateway tasks); with host-mode ports, one address per healthy gateway task, which the caller
keeps current. Each call goes to the next target in turn. A call that fails with UNAVAILABLE is
retried once on the next target, as a gRPC retry policy with two attempts would
(`RETRY_BACKOFF_S` later, waiting for the channel to connect); any other error, or a second
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
TARGETS_REFRESH_S = 0.5


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
        return {
            "sent": self.sent,
            "failed": self.failed,
            "retried": self.retried,
            "errors": dict(self.errors),
            "seconds": round(seconds, 1),
            "p50_ms": pick(0.5),
            "p99_ms": pick(0.99),
            "max_ms": round(ordered[-1], 1) if ordered else None,
        }


class Targets:
    """A worker's view of the targets file: one channel per gateway address, in file order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.read_at = 0.0
        self.addresses: list[str] = []
        self.stubs: dict[str, gateway_pb2_grpc.GatewayStub] = {}
        self.channels: dict[str, grpc.Channel] = {}

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.read_at < TARGETS_REFRESH_S:
            return
        self.read_at = time.monotonic()
        try:
            addresses = [line.strip() for line in self.path.read_text().splitlines() if line.strip()]
        except OSError:
            return
        if not addresses:
            return  # keep the last known ones rather than have none
        for gone in set(self.channels) - set(addresses):
            self.channels.pop(gone).close()
            self.stubs.pop(gone)
        for address in addresses:
            if address not in self.channels:
                self.channels[address] = grpc.insecure_channel(address)
                self.stubs[address] = gateway_pb2_grpc.GatewayStub(self.channels[address])
        self.addresses = addresses

    def stub(self, turn: int) -> gateway_pb2_grpc.GatewayStub:
        self.refresh()
        return self.stubs[self.addresses[turn % len(self.addresses)]]

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def call_with_one_retry(
    targets: Targets, turn: int, method: str, request
) -> tuple[object | None, bool, str | None]:
    """(response or None, whether it was retried, error code name or None)."""
    try:
        return getattr(targets.stub(turn), method)(request, timeout=CALL_TIMEOUT_S), False, None
    except grpc.RpcError as first:
        if first.code() != grpc.StatusCode.UNAVAILABLE:
            return None, False, first.code().name
    time.sleep(RETRY_BACKOFF_S)
    targets.refresh(force=True)
    try:
        return (
            getattr(targets.stub(turn + 1), method)(request, timeout=CALL_TIMEOUT_S, wait_for_ready=True),
            True,
            None,
        )
    except grpc.RpcError as second:
        return None, True, second.code().name


def worker(
    targets_file: Path, photos: list[bytes], tally: Tally, stop: threading.Event, max_requests: int, seed: int
) -> None:
    targets = Targets(targets_file)
    targets.refresh(force=True)
    listing_id = None
    turn = seed
    try:
        while not stop.is_set():
            with tally.lock:
                if tally.sent >= max_requests:
                    stop.set()
                    break
            turn += 1
            if listing_id is None or turn % 2:
                method = "SearchByImage"
                request = gateway_pb2.SearchByImageRequest(image=photos[turn % len(photos)], k=5)
            else:
                method = "SimilarListings"
                request = gateway_pb2.SimilarListingsRequest(listing_id=listing_id, k=5)
            started = time.perf_counter()
            response, retried, error = call_with_one_retry(targets, turn, method, request)
            tally.record(response is not None, retried, (time.perf_counter() - started) * 1000, error)
            if response is not None and response.results:
                listing_id = response.results[turn % len(response.results)].listing.id
    finally:
        targets.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.swarm_load", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--targets-file",
        required=True,
        type=Path,
        help="gateway addresses, host:port one a line (may change while running)",
    )
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
    threads = [
        threading.Thread(
            target=worker, args=(args.targets_file, photos, tally, stop, args.max_requests, i), daemon=True
        )
        for i in range(args.workers)
    ]
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
