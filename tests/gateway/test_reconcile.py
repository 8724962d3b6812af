"""The reconcile command against real indexer shards (in-process servers on ephemeral ports) and
the catalogue on both back ends: it finds vectors without a listing and listings without their
vectors, repairs what the catalogue can repair through the outbox, and says what it cannot."""

from __future__ import annotations

import numpy as np
import pytest

from common.shard_map import initial
from services.gateway.catalogue import Catalogue, StoredVector
from services.gateway.config import RetryPolicy
from services.gateway.downstream import Deadline, IndexerShards, IndexItem
from services.gateway.index_catalogue import main as index_catalogue_main
from services.gateway.outbox import OutboxApplier
from services.gateway.reconcile import main, reconcile
from tests.gateway.test_gateway_units import listing
from tests.support.services import start_shards

DIM = 4


def vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def shards(tmp_path):
    servers = start_shards(tmp_path, f"image:{DIM}:flat:ip,text:{DIM}:flat:ip")
    client = IndexerShards([f"127.0.0.1:{s.port}" for s in servers], RetryPolicy(2, 0.01, 0.05))
    yield client
    client.close()
    for server in servers:
        server.stop(None)


def add_indexed(catalogue: Catalogue, shards: IndexerShards, listing_id: str, seed: int):
    item = listing(listing_id)
    stored = [StoredVector("image", image_id, vector(seed + n)) for n, image_id in enumerate(item.image_ids)]
    stored.append(StoredVector("text", listing_id, vector(seed + 100)))
    catalogue.add_pending(item, stored, shards.shard_for(listing_id))
    assert OutboxApplier(catalogue, shards).apply_listing(listing_id, Deadline(10)).done
    return item


def put(shards: IndexerShards, shard: int, item_id: str, listing_id: str, seed: int) -> None:
    shards.upsert(shard, [IndexItem(item_id, vector(seed), listing_id)], Deadline(10))


def test_reconcile_reports_then_repairs(catalogue_url, shards, capsys):
    deadline = Deadline(30)
    with Catalogue.open(catalogue_url) as catalogue:
        kept = add_indexed(catalogue, shards, "kept", 1)
        damaged = add_indexed(catalogue, shards, "damaged", 2)
        # a bulk-loaded listing indexed by index_catalogue: the catalogue keeps no vectors of it
        bulk = listing("bulk", images=("p",))
        catalogue.add(bulk)
        put(shards, shards.shard_for("bulk"), "bulk-p", "bulk", 3)
        clean = reconcile(catalogue, shards)
        assert (clean.orphans, clean.missing, clean.pending) == (0, 0, 0), clean.examples

        put(shards, shards.shard_for("ghost"), "ghost-1", "ghost", 4)  # listing never stored
        wrong = 1 - shards.shard_for("kept")
        put(shards, wrong, "kept-a", "kept", 5)  # a copy on the wrong shard
        put(shards, shards.shard_for("kept"), "kept-zz", "kept", 6)  # a photo the listing lacks
        shards.delete(shards.shard_for("damaged"), [damaged.image_ids[0]], deadline)
        shards.delete(shards.shard_for("damaged"), ["damaged"], deadline, collection="text")
        shards.delete(shards.shard_for("bulk"), ["bulk-p"], deadline)

        found = reconcile(catalogue, shards)
        assert (found.orphans, found.missing, found.unrepairable) == (3, 3, 1), found.examples
        assert catalogue.pending_outbox() == []  # reporting changes nothing

        repaired = reconcile(catalogue, shards, repair=True)
        assert repaired.repaired == 3 + 1 and repaired.unrepairable == 1
        after = reconcile(catalogue, shards)
        assert (after.orphans, after.missing) == (0, 1), after.examples  # only "bulk" is left
        assert catalogue.pending_outbox() == []
        home = shards.shard_for("damaged")
        assert {i.id for i in shards.fetch(home, damaged.image_ids, deadline)} == set(damaged.image_ids)
        assert [i.id for i in shards.fetch(home, ["damaged"], deadline, collection="text")] == ["damaged"]
        assert shards.fetch(wrong, ["kept-a"], deadline) == []
        assert catalogue.get("kept") == kept

    addrs = ",".join(r.downstream.target for r in shards.replicas)
    assert main(["--db", catalogue_url, "--indexers", addrs]) == 1  # "bulk" still lacks its vector
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "RECONCILE orphans=0 missing=1 pending=0 unrepairable=1 repaired=0"
    )


@pytest.mark.parametrize(
    "command, prefix",
    [(main, "reconcile: "), (index_catalogue_main, "error: ")],
    ids=["reconcile", "index_catalogue"],
)
def test_the_tools_refuse_a_shard_map_for_other_shards(tmp_path, capsys, command, prefix):
    """reconcile and index_catalogue open the catalogue and the shards alike: a shard map made for
    three shards with two configured is refused, saying so, before anything is written."""
    db = tmp_path / "catalogue.sqlite3"
    with Catalogue.open(str(db)) as catalogue:
        catalogue.shard_map_store().publish(initial(3))
    argv = ["--db", str(db), "--indexers", "127.0.0.1:1,127.0.0.1:2"]
    if command is index_catalogue_main:
        argv += ["--artifact", str(tmp_path)]
    assert command(argv) == 2
    assert capsys.readouterr().err.startswith(f"{prefix}shard map: ")
