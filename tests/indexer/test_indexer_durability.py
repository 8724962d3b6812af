"""IndexStore durability: WAL replay, snapshots, torn tails, corruption that refuses to start,
configuration mismatches and the data-directory lock."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest

from indexer_testutil import catalogue_attributes, ids_for, unit_vectors
from services.indexer.attributes import Attributes
from services.indexer.core import IndexStore, StoreOptions
from services.indexer.errors import CorruptData, IndexerError, InvalidArgument, NotFound
from services.indexer.spec import CollectionSpec
from services.indexer.wal import SEGMENT_HEADER, WriteAheadLog, encode_record, list_segments, segment_path

D = 8
SPECS = [CollectionSpec("image", D), CollectionSpec("text", 4, "flat", "l2")]
NO_AUTO_SNAPSHOT = StoreOptions(snapshot_every_records=0, snapshot_every_bytes=0)


def open_store(path: Path, specs=SPECS, **options) -> IndexStore:
    return IndexStore.open(
        path,
        specs,
        options=StoreOptions(**{"snapshot_every_records": 0, "snapshot_every_bytes": 0, **options}),
    )


def fill(store: IndexStore, n: int = 50, start: int = 0) -> tuple[list[str], np.ndarray]:
    ids = ids_for(n + start)[start:]
    vectors = unit_vectors(n, D, seed=start)
    for i in range(0, n, 10):  # several WAL records
        store.upsert("image", ids[i : i + 10], vectors[i : i + 10], catalogue_attributes(n)[i : i + 10])
    return ids, vectors


def assert_holds(store: IndexStore, ids: list[str], vectors: np.ndarray) -> None:
    items, missing = store.fetch("image", ids)
    assert missing == []
    np.testing.assert_allclose(np.stack([i.vector for i in items]), vectors, atol=1e-6)


def newest_segment(data_dir: Path) -> Path:
    return segment_path(data_dir / "wal", list_segments(data_dir / "wal")[-1])


def test_wal_alone_restores_everything_after_a_crash(tmp_path):
    store = open_store(tmp_path)
    ids, vectors = fill(store)
    store.delete("image", ids[:5])
    store.upsert("text", ["t1"], [[1.0, 2.0, 3.0, 4.0]])
    store._release_data_dir()  # a crash: no final snapshot, nothing flushed beyond the WAL
    reopened = open_store(tmp_path)
    assert reopened.collection("image").count == 45
    assert_holds(reopened, ids[5:], vectors[5:])
    assert reopened.fetch("image", ids[:5])[1] == ids[:5]
    assert reopened.fetch("text", ["t1"])[0][0].vector.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert reopened.fetch("image", [ids[7]])[0][0].attributes == catalogue_attributes(50)[7]
    reopened.close()


def test_snapshot_truncates_the_wal_and_restart_loads_snapshot_plus_newer_records(tmp_path):
    store = open_store(tmp_path)
    ids, vectors = fill(store)
    assert store.snapshot() == "00000002"
    assert list_segments(tmp_path / "wal") == [2]
    assert newest_segment(tmp_path).stat().st_size == 16  # just the segment header
    more_ids, more_vectors = fill(store, 20, start=50)
    store._release_data_dir()
    reopened = open_store(tmp_path)
    assert reopened.collection("image").count == 70
    assert_holds(reopened, ids + more_ids, np.vstack([vectors, more_vectors]))
    reopened.close()  # final snapshot
    assert list_segments(tmp_path / "wal") == [3]
    again = open_store(tmp_path)
    assert again.collection("image").count == 70
    again.close()


def test_snapshot_of_every_index_type_round_trips(tmp_path):
    specs = [
        CollectionSpec("flat", D),
        CollectionSpec("ivf", D, "ivf_flat", nlist=4),
        CollectionSpec("hnsw", D, "hnsw"),
    ]
    store = open_store(tmp_path, specs)
    vectors = unit_vectors(300, D, seed=3)
    ids = ids_for(300)
    for spec in specs:
        store.upsert(spec.name, ids, vectors, catalogue_attributes(300))
        store.delete(spec.name, ids[:10])
    store.close()
    reopened = open_store(tmp_path, specs)
    for spec in specs:
        index = reopened.collection(spec.name)
        assert index.count == 290
        hits = index.search(vectors[10:15], 1)
        assert [h[0].id for h in hits] == ids[10:15]
    reopened.close()


def test_periodic_trigger_snapshots_after_n_records(tmp_path):
    store = IndexStore.open(tmp_path, SPECS, options=StoreOptions(snapshot_every_records=3))
    store.start_snapshots(interval_s=0)
    fill(store, 40)
    deadline = time.monotonic() + 10
    while not (tmp_path / "CURRENT").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (tmp_path / "CURRENT").exists()  # written by the background thread, before close
    store.close()
    reopened = open_store(tmp_path)
    assert reopened.collection("image").count == 40
    reopened.close()


def test_torn_wal_tail_is_dropped_with_a_warning(tmp_path, caplog):
    store = open_store(tmp_path)
    ids, vectors = fill(store, 30)
    store._release_data_dir()
    segment = newest_segment(tmp_path)
    size = segment.stat().st_size
    with open(segment, "r+b") as f:  # the last record (10 items) was only half written
        f.truncate(size - 100)
    with caplog.at_level(logging.WARNING):
        reopened = open_store(tmp_path)
    assert "torn WAL tail" in caplog.text
    assert reopened.collection("image").count == 20
    assert_holds(reopened, ids[:20], vectors[:20])
    assert reopened.fetch("image", ids[20:])[0] == []  # nothing of the torn batch
    # the torn bytes are gone: new writes append cleanly and survive another restart
    reopened.upsert("image", ["after"], unit_vectors(1, D, seed=9))
    reopened._release_data_dir()
    again = open_store(tmp_path)
    assert again.collection("image").count == 21
    again.close()


def test_garbage_after_the_last_record_is_a_torn_tail(tmp_path, caplog):
    store = open_store(tmp_path)
    fill(store, 20)
    store._release_data_dir()
    with open(newest_segment(tmp_path), "ab") as f:
        f.write(b"REC1\x00\x01")  # a header cut short
    with caplog.at_level(logging.WARNING):
        reopened = open_store(tmp_path)
    assert reopened.collection("image").count == 20
    reopened.close()


def test_damaged_record_in_the_middle_of_the_wal_refuses_to_start(tmp_path):
    store = open_store(tmp_path)
    fill(store, 30)
    store._release_data_dir()
    segment = newest_segment(tmp_path)
    data = bytearray(segment.read_bytes())
    data[200] ^= 0xFF  # inside an early record; valid records follow
    segment.write_bytes(bytes(data))
    with pytest.raises(CorruptData, match="followed by valid records"):
        open_store(tmp_path)
    # the refusal released the data directory and changed nothing on disk
    assert segment.read_bytes() == bytes(data)


def test_damaged_older_segment_refuses_to_start(tmp_path):
    store = open_store(tmp_path)
    fill(store, 20)
    store._wal.rotate()  # as if a snapshot had started but not finished
    fill(store, 10, start=20)
    store._release_data_dir()
    first = segment_path(tmp_path / "wal", 1)
    first.write_bytes(first.read_bytes()[:-30])
    with pytest.raises(CorruptData, match="not the newest"):
        open_store(tmp_path)


def test_missing_wal_segment_refuses_to_start(tmp_path):
    store = open_store(tmp_path)
    fill(store, 20)
    store._wal.rotate()
    fill(store, 10, start=20)
    store._wal.rotate()
    store._release_data_dir()
    segment_path(tmp_path / "wal", 2).unlink()
    with pytest.raises(CorruptData, match="segment 00000002 is missing"):
        open_store(tmp_path)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_snapshot_refuses_to_start(tmp_path, damage):
    store = open_store(tmp_path)
    fill(store, 40)
    store.close()
    snapshot_dir = tmp_path / "snapshots" / (tmp_path / "CURRENT").read_text().strip()
    target = snapshot_dir / "c0.faiss"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-8])
    else:
        target.unlink()
    with pytest.raises(CorruptData, match="c0.faiss"):
        open_store(tmp_path)


def test_snapshot_inconsistent_with_its_manifest_refuses_to_start(tmp_path):
    store = open_store(tmp_path)
    fill(store, 40)
    store.close()
    manifest_path = tmp_path / "snapshots" / (tmp_path / "CURRENT").read_text().strip() / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["collections"][0]["count"] = 41
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptData, match="manifest says 41"):
        open_store(tmp_path)


def test_explicit_configuration_that_contradicts_stored_data_refuses_to_start(tmp_path):
    open_store(tmp_path).close()
    with pytest.raises(InvalidArgument, match="stored with dimension 8"):
        IndexStore.open(tmp_path, [CollectionSpec("image", 16)], specs_are_explicit=True)
    # the built-in default never overrides what is stored
    store = IndexStore.open(tmp_path, [CollectionSpec("image", 16)], specs_are_explicit=False)
    assert store.collection("image").dimension == 8
    store.close()


def test_a_second_process_cannot_open_the_same_data_dir(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(IndexerError, match="in use by another indexer"):
        open_store(tmp_path)
    store.close()
    open_store(tmp_path).close()


def test_unknown_collection_and_auto_create(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(NotFound, match="collection 'other' does not exist"):
        store.upsert("other", ["a"], [[1.0, 0.0]])
    store.close()
    store = open_store(tmp_path, auto_create=True)
    assert store.upsert("other", ["a"], [[1.0, 0.0]]).inserted == 1
    store._release_data_dir()
    reopened = open_store(tmp_path)  # the creation is in the WAL
    assert reopened.collection("other").dimension == 2 and reopened.collection("other").count == 1
    assert reopened.collection("").name == "image"  # empty name means "image"
    reopened.close()


def test_replayed_write_that_no_longer_fits_is_corruption(tmp_path):
    store = open_store(tmp_path, auto_create=True)
    store.upsert("other", ["a"], [[1.0, 0.0]])
    store._release_data_dir()
    # remove the creation record by rewriting the log without it: the upsert now has no collection
    wal = WriteAheadLog(tmp_path / "wal")
    records = list(wal.recover(1, 0))
    wal.close()
    kept = [r for r in records if r.header.get("spec", {}).get("name") != "other"]
    segment = newest_segment(tmp_path)
    header = segment.read_bytes()[: SEGMENT_HEADER.size]
    segment.write_bytes(
        header + b"".join(encode_record(n + 1, r.kind, r.header, r.body) for n, r in enumerate(kept))
    )
    with pytest.raises(CorruptData, match="does not exist"):
        open_store(tmp_path)


def test_compaction_at_snapshot_time_keeps_data(tmp_path):
    store = open_store(tmp_path, compact_dead_fraction=0.2)
    ids, vectors = fill(store, 50)
    store.delete("image", ids[:20])
    store.snapshot()
    index = store.collection("image")
    assert index.dead_count == 0 and index.slot_count == 30
    store.close()
    reopened = open_store(tmp_path)
    assert_holds(reopened, ids[20:], vectors[20:])
    reopened.close()


def test_attributes_survive_restart(tmp_path):
    store = open_store(tmp_path)
    store.upsert(
        "image", ["a", "b"], unit_vectors(2, D), [Attributes("L1", "Music", 9.5, "Leeds"), Attributes()]
    )
    store.close()
    reopened = open_store(tmp_path)
    items, _ = reopened.fetch("image", ["a", "b"])
    assert [i.attributes for i in items] == [Attributes("L1", "Music", 9.5, "Leeds"), Attributes()]
    reopened.close()
