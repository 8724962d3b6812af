"""Loading the training pipeline's embeddings (the baseline project's JSON, .npy + ids, .npz), attributes from a
CSV or the prepared data, and the build command writing a snapshot the server starts from."""

from __future__ import annotations

import csv
import json

import grpc
import numpy as np
import pytest

from indexer_testutil import ids_for, unit_vectors
from common.artifact import EMBEDDINGS_DIR, IMAGE_EMBEDDINGS_FILE, IMAGE_EMBEDDINGS_JSON_FILE, IMAGE_IDS_FILE
from marketplace.indexer.v1 import indexer_pb2 as pb
from marketplace.indexer.v1 import indexer_pb2_grpc
from services.indexer import build
from services.indexer.attributes import Attributes
from services.indexer.config import IndexerConfig
from services.indexer.core import IndexStore
from common.prices import price_value
from services.indexer.loader import (
    attributes_from_prepared,
    load_attributes_csv,
    load_embeddings,
    write_attributes_csv,
)
from services.indexer.server import start
from services.indexer.spec import CollectionSpec

D = 12


def write_npy(folder, ids, vectors):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / IMAGE_EMBEDDINGS_FILE, vectors)
    (folder / IMAGE_IDS_FILE).write_text(json.dumps(ids))


def test_all_embedding_formats_load_the_same_data(tmp_path):
    ids, vectors = ids_for(30), unit_vectors(30, D)
    write_npy(tmp_path / "npy" / EMBEDDINGS_DIR, ids, vectors)
    np.savez(tmp_path / "image_embeddings.npz", ids=np.array(ids), embeddings=vectors)
    baseline = tmp_path / "baseline" / IMAGE_EMBEDDINGS_JSON_FILE
    baseline.parent.mkdir()
    baseline.write_text(json.dumps({i: v.tolist() for i, v in zip(ids, vectors)}))
    for source in (tmp_path / "npy", tmp_path / "image_embeddings.npz", tmp_path / "baseline"):
        loaded = load_embeddings(source)
        assert loaded.ids == ids
        np.testing.assert_allclose(loaded.vectors, vectors, atol=1e-6)


def test_npy_without_ids_is_a_clear_error(tmp_path):
    np.save(tmp_path / IMAGE_EMBEDDINGS_FILE, unit_vectors(3, D))
    with pytest.raises(FileNotFoundError, match="no ids file"):
        load_embeddings(tmp_path)


@pytest.mark.parametrize("text,value", [("£1,250.00", 1250.0), ("12", 12.0), ("", None), ("free", None)])
def test_prices_are_parsed_leniently(text, value):
    assert price_value(text) == value


def write_prepared(folder):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "images.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "product_id", "main_category"])
        for n, image_id in enumerate(ids_for(30)):
            w.writerow([image_id, f"P{n // 3}", "Music" if n % 2 else "Sports"])
    with open(folder / "listings.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "price", "location"])
        for p in range(9):  # P9 has no listing row
            w.writerow([f"P{p}", f"£{p * 10}.00", f"Town {p}"])


def test_prepared_data_join_and_csv_round_trip(tmp_path):
    write_prepared(tmp_path / "data")
    attributes = attributes_from_prepared(tmp_path / "data")
    assert attributes[ids_for(30)[4]] == Attributes("P1", "Sports", 10.0, "Town 1")
    assert attributes[ids_for(30)[29]] == Attributes("P9", "Music", None, "")
    write_attributes_csv(attributes, tmp_path / "attributes.csv")
    assert load_attributes_csv(tmp_path / "attributes.csv") == attributes


def test_build_command_writes_a_snapshot_the_server_serves(tmp_path, capsys):
    ids, vectors = ids_for(30), unit_vectors(30, D, seed=3)
    write_npy(tmp_path / "model" / EMBEDDINGS_DIR, ids, vectors)
    write_prepared(tmp_path / "data")
    data_dir = tmp_path / "indexer"
    # another collection already in the data directory is kept
    store = IndexStore.open(data_dir, [CollectionSpec("text", 4)])
    store.upsert("text", ["t"], [[1.0, 0, 0, 0]])
    store.close()

    code = build.main(
        [
            "--embeddings",
            str(tmp_path / "model"),
            "--data-dir",
            str(data_dir),
            "--type",
            "ivf_flat",
            "--nlist",
            "2",
            "--prepared",
            str(tmp_path / "data"),
        ]
    )
    assert code == 0
    summary = capsys.readouterr().out
    assert "count=30" in summary and "index_type=ivf_flat" in summary and "with_attributes=30" in summary

    config = IndexerConfig.local(
        host="127.0.0.1",
        port=0,
        data_dir=data_dir,
        log_level="info",
        collections=(CollectionSpec("image", 1280), CollectionSpec("text", 384)),
        collections_explicit=False,
    )
    server = start(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = indexer_pb2_grpc.IndexerStub(channel)
            stats = {
                c.name: (c.count, c.dimension, c.index_type)
                for c in stub.GetStats(pb.GetStatsRequest(), timeout=5).collections
            }
            assert stats == {"image": (30, D, "ivf_flat"), "text": (1, 4, "flat")}
            reply = stub.Search(
                pb.SearchRequest(
                    queries=[pb.Vector(values=vectors[7].tolist())], k=1, params=pb.SearchParams(nprobe=2)
                ),
                timeout=5,
            )
            top = reply.results[0].neighbors[0]
            assert (top.id, top.attributes.listing_id, top.attributes.price) == (ids[7], "P2", 20.0)
    finally:
        server.stop(grace=None)


def test_build_fails_cleanly_without_embeddings(tmp_path, capsys):
    assert build.main(["--embeddings", str(tmp_path), "--data-dir", str(tmp_path / "d")]) == 1
    assert "no image_embeddings" in capsys.readouterr().err
