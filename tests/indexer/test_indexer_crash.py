"""Crash recovery of the real server process: write while it is SIGKILLed mid-stream, restart it
on the same data directory, and find every acknowledged item (and no half-written batch)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from marketplace.indexer.v1 import indexer_pb2 as pb
from marketplace.indexer.v1 import indexer_pb2_grpc
from scripts.stack import free_port, wait_healthy
from scripts.stack import spawn as spawn_service

D = 16
BATCH = 3


def spawn(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """``python -m services.indexer`` on ``data_dir``, waited for until it serves; writes open
    (an empty WRITE_TOKEN counts as unset, whatever the environment says)."""
    indexer = spawn_service(
        "indexer",
        free_port(),
        log_path,
        {
            "WRITE_TOKEN": "",
            "INDEXER_COLLECTIONS": f"image:{D}:flat:ip",
            "LOG_LEVEL": "info",
            "INDEXER_SNAPSHOT_WAL_RECORDS": "40",
            "INDEXER_FAISS_THREADS": "1",
        },
        args=["--data-dir", str(data_dir)],
    )
    try:
        wait_healthy(indexer.address, 60, indexer.process, log_path)
    except BaseException:
        indexer.kill()
        raise
    return indexer.process, indexer.address


def batch_items(writer: int, number: int) -> list[pb.Item]:
    rng = np.random.default_rng(writer * 100_000 + number)
    vectors = rng.standard_normal((BATCH, D)).astype(np.float32)
    return [
        pb.Item(
            id=f"w{writer}-b{number}-{j}",
            vector=vectors[j].tolist(),
            attributes=pb.Attributes(listing_id=f"w{writer}-b{number}", price=float(number)),
        )
        for j in range(BATCH)
    ]


def expected_vector(item: pb.Item) -> np.ndarray:
    v = np.asarray(item.vector, dtype=np.float32)
    return v / np.linalg.norm(v)


class Writer(threading.Thread):
    """Upserts batches until the server goes away; remembers what was acknowledged."""

    def __init__(self, number: int, address: str) -> None:
        super().__init__(daemon=True)
        self.number = number
        self.address = address
        self.acknowledged: list[int] = []
        self.in_flight: int | None = None

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = indexer_pb2_grpc.IndexerStub(channel)
            for batch in range(100_000):
                self.in_flight = batch
                try:
                    stub.Upsert(pb.UpsertRequest(items=batch_items(self.number, batch)), timeout=10)
                except grpc.RpcError:
                    return
                self.acknowledged.append(batch)
                self.in_flight = None


def test_sigkill_mid_stream_loses_no_acknowledged_write(tmp_path):
    data_dir = tmp_path / "data"
    log_path = tmp_path / "indexer.log"
    process, address = spawn(data_dir, log_path)
    writers = [Writer(n, address) for n in range(2)]
    for w in writers:
        w.start()
    deadline = time.monotonic() + 60
    while sum(len(w.acknowledged) for w in writers) < 120 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # mid-stream: both writers have requests in flight
    process.wait()
    for w in writers:
        w.join(30)
    acknowledged = sum(len(w.acknowledged) for w in writers)
    assert acknowledged >= 120, log_path.read_text()[-2000:]

    process, address = spawn(data_dir, log_path)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = indexer_pb2_grpc.IndexerStub(channel)
            stored = 0
            for w in writers:
                for batch in w.acknowledged:
                    items = batch_items(w.number, batch)
                    reply = stub.Fetch(pb.FetchRequest(ids=[i.id for i in items]), timeout=10)
                    assert list(reply.not_found) == [], f"acknowledged batch {w.number}/{batch} lost"
                    for sent, got in zip(items, reply.items):
                        np.testing.assert_allclose(got.vector, expected_vector(sent), atol=1e-6)
                        assert got.attributes == sent.attributes
                    stored += BATCH
                if w.in_flight is not None:  # unacknowledged: all of it or none of it
                    items = batch_items(w.number, w.in_flight)
                    reply = stub.Fetch(pb.FetchRequest(ids=[i.id for i in items]), timeout=10)
                    assert len(reply.items) in (0, BATCH), "half-written batch after recovery"
                    stored += len(reply.items)
            stats = stub.GetStats(pb.GetStatsRequest(collection="image"), timeout=10)
            assert stats.collections[0].count == stored
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log_path.read_text()[-2000:]
    assert (data_dir / "CURRENT").exists()  # the clean shutdown wrote a final snapshot
