"""Indexer configuration from the environment, and refusing to start on damaged data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError
from services.indexer.config import IndexerConfig
from services.indexer.core import IndexStore, StoreOptions
from services.indexer.spec import CollectionSpec, parse_collections
from services.indexer.errors import InvalidArgument
from services.indexer.wal import list_segments, segment_path

REPO = Path(__file__).resolve().parents[2]


def test_collections_and_limits_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(
        "INDEXER_COLLECTIONS", "image:512:hnsw:ip:m=16:ef_search=128, text:384:ivf_flat:l2:nlist=64"
    )
    monkeypatch.setenv("INDEXER_MAX_BATCH", "10")
    monkeypatch.setenv("INDEXER_MAX_MESSAGE_MB", "2")
    config = IndexerConfig.from_env(["--data-dir", str(tmp_path), "--port", "0"])
    assert config.collections == (
        CollectionSpec("image", 512, "hnsw", "ip", hnsw_m=16, ef_search=128),
        CollectionSpec("text", 384, "ivf_flat", "l2", nlist=64),
    )
    assert config.collections_explicit and config.max_batch == 10
    assert config.limits.max_receive_bytes == 2 * 1024 * 1024
    assert config.collections[1].normalize is False  # l2 keeps raw vectors


def test_default_collections_are_not_explicit(monkeypatch):
    monkeypatch.delenv("INDEXER_COLLECTIONS", raising=False)
    config = IndexerConfig.from_env([])
    assert [c.name for c in config.collections] == ["image", "text"] and not config.collections_explicit


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("image", "name:dim"),
        ("image:abc", "not an integer"),
        ("image:16:annoy", "index type"),
        ("image:16:flat:cosine", "metric"),
        ("image:16:flat:ip:colour=red", "unknown option"),
        ("image:16,image:32", "configured twice"),
        ("bad name:16", "letters, digits"),
    ],
)
def test_bad_collection_specs_are_rejected_with_a_reason(text, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        parse_collections(text)


def test_bad_environment_is_a_configuration_error(monkeypatch):
    monkeypatch.setenv("INDEXER_COLLECTIONS", "image:0")
    with pytest.raises(ConfigError, match="INDEXER_COLLECTIONS"):
        IndexerConfig.from_env([])


def test_server_process_refuses_to_start_on_a_damaged_wal(tmp_path):
    store = IndexStore.open(
        tmp_path, [CollectionSpec("image", 4)], options=StoreOptions(snapshot_every_records=0)
    )
    for n in range(5):
        store.upsert("image", [f"i{n}"], [[1.0, n, 0, 0]])
    store._release_data_dir()
    segment = segment_path(tmp_path / "wal", list_segments(tmp_path / "wal")[-1])
    data = bytearray(segment.read_bytes())
    data[60] ^= 0xFF  # inside the first records, valid ones follow
    segment.write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": str(REPO), "INDEXER_COLLECTIONS": "image:4"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.indexer",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "refusing to start" in result.stderr and "followed by valid records" in result.stderr


def test_replica_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INDEXER_SHARD", "1")
    monkeypatch.setenv("INDEXER_PEERS", "10.0.0.2:50052, 10.0.0.3:50052")
    config = IndexerConfig.from_env(["--data-dir", str(tmp_path)])
    assert (config.shard, config.partitions) == (1, 256)
    assert config.peers == ("10.0.0.2:50052", "10.0.0.3:50052")
    monkeypatch.delenv("INDEXER_SHARD")
    monkeypatch.delenv("INDEXER_PEERS")
    assert (IndexerConfig.from_env([]).shard, IndexerConfig.from_env([]).partitions) == (-1, 0)
    with pytest.raises(ConfigError, match="INDEXER_SHARD=8 must be below INDEXER_PARTITIONS=8"):
        IndexerConfig.from_env(["--shard", "8", "--partitions", "8"])


def test_server_process_refuses_another_shards_data_naming_both(tmp_path):
    (tmp_path / "REPLICA.json").write_text('{"shard": 0, "partitions": 256}\n')
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "INDEXER_SHARD": "1",
        "INDEXER_COLLECTIONS": "image:4:flat:ip",
    }
    result = subprocess.run(
        [sys.executable, "-m", "services.indexer", "--port", "0", "--data-dir", str(tmp_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "holds shard 0 of a 256-partition cluster" in result.stderr
    assert "configured as shard 1 of a 256-partition cluster" in result.stderr
