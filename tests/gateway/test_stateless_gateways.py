"""Stateless gateways: two gateway processes on one real PostgreSQL catalogue, the real embedder
(pretrained test model) and two real indexer shards, all on ephemeral loopback ports; and a
gateway SIGKILLed at random points of its write path, then restarted, losing nothing.

The embedder and the indexers run in this process (servers on real ports); the gateways are
real processes (``python -m services.gateway``), so a SIGKILL is a real crash.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from scripts.stack import free_port, spawn, wait_ready
from services.embedder.config import EmbedderConfig
from services.embedder.server import start as start_embedder
from services.gateway.catalogue import Catalogue
from services.gateway.client import GatewayClient
from services.gateway.config import RetryPolicy
from services.gateway.downstream import Deadline, IndexerShards
from services.gateway.reconcile import reconcile
from services.indexer.config import IndexerConfig
from services.indexer.errors import IndexerError
from services.indexer.server import open_store
from services.indexer.server import start as start_indexer
from services.indexer.spec import parse_collections
from tests.support.photos import photo_files, real_photos
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.timeout(600)
CATEGORY = "Home & Garden"


def photos(count: int) -> list[bytes]:
    files = photo_files(count)
    if len(files) == count:
        return [path.read_bytes() for path in files]
    base = real_photos(4)  # no marketplace data: distinct enough crops of the samples
    from PIL import Image
    import io

    out = []
    for n in range(count):
        image = Image.open(io.BytesIO(base[n % 4])).convert("RGB")
        w, h = image.size
        box = (n % 7 * w // 40, n // 7 % 7 * h // 40, w - n % 5 * w // 40, h - n % 3 * h // 40)
        buffer = io.BytesIO()
        image.crop(box).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def indexer_config(root: Path, n: int) -> IndexerConfig:
    return IndexerConfig.local(
        host="127.0.0.1",
        port=0,
        data_dir=root / f"indexer-{n}",
        log_level="warning",
        collections=tuple(parse_collections("image:1280:flat:ip")),
        collections_explicit=True,
        fsync=False,
    )


def gateway_env(db_url: str, embedder_port: int, shards, lease_s: float = 10) -> dict[str, str]:
    return {
        "GATEWAY_DB": db_url,
        "EMBEDDER_ADDR": f"127.0.0.1:{embedder_port}",
        "INDEXER_ADDRS": ",".join(f"127.0.0.1:{s.port}" for s in shards),
        "LOG_LEVEL": "warning",
        "GATEWAY_OUTBOX_LEASE_S": str(lease_s),
        "GATEWAY_OUTBOX_INTERVAL_S": "0.2",
        "GATEWAY_READINESS_INTERVAL_S": "1",
        "GATEWAY_DOWNSTREAM_TIMEOUT_S": "30",
        "GATEWAY_MAX_WORKERS": "16",
    }


def shards_client(shards) -> IndexerShards:
    return IndexerShards([f"127.0.0.1:{s.port}" for s in shards], RetryPolicy(3, 0.05, 0.2))


@pytest.fixture(scope="module")
def services(tmp_path_factory, test_artifact):
    root = tmp_path_factory.mktemp("replicas")
    embedder = start_embedder(
        EmbedderConfig.local(artifact_dir=test_artifact, host="127.0.0.1", port=0, text_model="off")
    )
    shards = [start_indexer(indexer_config(root, n)) for n in range(2)]
    yield root, embedder, shards
    for server in [embedder, *shards]:
        server.stop(None)


@pytest.fixture(scope="module")
def two_gateways(services, postgres):
    root, embedder, shards = services
    url = postgres.create_database("replicas")
    env = gateway_env(url, embedder.port, shards)
    gateways = [spawn("gateway", free_port(), root / f"gateway-{name}.log", env) for name in "ab"]
    clients = []
    try:
        for gateway in gateways:  # started together: they migrate the empty database one at a time
            wait_ready(gateway, 180)
        clients = [GatewayClient(g.address, timeout=60) for g in gateways]
        yield url, clients, shards
    finally:
        for client in clients:
            client.close()
        for gateway in gateways:
            gateway.stop()


def test_a_listing_added_through_one_gateway_is_found_through_the_other(two_gateways):
    url, (a, b), _ = two_gateways
    chair, lamp, table = photos(3)
    first = a.add([chair], title="Oak chair", main_category=CATEGORY, price=20)
    a.add([lamp], title="Brass lamp", main_category=CATEGORY)
    a.add([table], title="Pine table", main_category=CATEGORY)
    # at once, through B: the catalogue is shared and the vectors were acknowledged before A answered
    assert b.get(first.id) == first
    top = b.search_by_image(chair, k=3)[0]
    assert (top.listing.id, top.matched_image_id) == (first.id, first.image_ids[0])
    similar = b.similar(first.id, k=2)
    assert similar and first.id not in {r.listing.id for r in similar}

    removed = b.remove(first.id)
    assert (removed.listing_id, removed.images_removed, removed.pending) == (first.id, 1, False)
    with pytest.raises(grpc.RpcError) as raised:
        a.get(first.id)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert first.id not in {r.listing.id for r in a.search_by_image(chair, k=3)}
    with pytest.raises(grpc.RpcError) as raised:
        a.remove(first.id)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_adds_over_both_gateways_are_exact(two_gateways):
    url, clients, shards = two_gateways
    count = 200
    images = photos(count)
    with Catalogue.open(url) as catalogue:
        before = catalogue.count(include_pending=True)

    def add(n: int):
        client = clients[n % 2]
        return client.add_listing(
            [images[n]], title=f"Listing {n}", main_category=CATEGORY, listing_id=f"burst-{n:03d}", price=n
        )

    with ThreadPoolExecutor(16) as pool:
        added = list(pool.map(add, range(count)))
    assert [result.listing.id for result in added] == [f"burst-{n:03d}" for n in range(count)]
    with Catalogue.open(url) as catalogue:  # a push that timed out on a loaded machine lands later
        end = time.monotonic() + 60
        while catalogue.pending_outbox() and time.monotonic() < end:
            time.sleep(0.2)

    # the same ids again, through the other gateway, concurrently: every one refused, none doubled
    def again(n: int):
        try:
            clients[1 - n % 2].add(
                [images[n]], title="dup", main_category=CATEGORY, listing_id=f"burst-{n:03d}"
            )
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(again, range(0, count, 10))) == {grpc.StatusCode.ALREADY_EXISTS}

    with Catalogue.open(url) as catalogue:
        assert catalogue.count(include_pending=True) == before + count
        assert catalogue.count() == before + count  # all live
        assert catalogue.pending_outbox() == []
    ids = {f"burst-{n:03d}" for n in range(count)}
    for n in range(count):
        listing = clients[(n + 1) % 2].get(f"burst-{n:03d}")
        assert listing.price == n and len(listing.image_ids) == 1
    indexer = shards_client(shards)
    try:
        listed = [item for shard in range(2) for item in indexer.list_ids(shard, Deadline(30))]
        burst = [(item, owner) for item, owner in listed if owner in ids]
        assert len(burst) == count and len({item for item, _ in burst}) == count  # no duplicates

        def found_by_its_photo(n: int) -> bool:  # k=5: a marketplace photo may have twins
            results = clients[n % 2].search_by_image(images[n], k=5)
            return f"burst-{n:03d}" in {r.listing.id for r in results}

        with ThreadPoolExecutor(8) as pool:
            unfound = [
                n for n, found in zip(range(count), pool.map(found_by_its_photo, range(count))) if not found
            ]
        assert unfound == [], f"not found by their own photo: {unfound}"
        with Catalogue.open(url) as catalogue:
            report = reconcile(catalogue, indexer)
        assert (report.orphans, report.missing, report.pending) == (0, 0, 0), report.examples
    finally:
        indexer.close()


def test_a_serving_gateway_outlives_its_database_going_away(services, tmp_path):
    """PostgreSQL stops under a serving gateway: its catalogue calls are UNAVAILABLE naming the
    database; once the server is back the same gateway process serves again (no restart)."""
    _, embedder, shards = services
    cluster = PostgresCluster().start()
    gateway = None
    try:
        url = cluster.create_database("outage")
        env = {**gateway_env(url, embedder.port, shards), "GATEWAY_DB_CONNECT_TIMEOUT_S": "2"}
        gateway = spawn("gateway", free_port(), tmp_path / "gateway.log", env)
        wait_ready(gateway, 180)
        before, during, after = photos(3)
        with GatewayClient(gateway.address, timeout=60) as client:
            added = client.add([before], title="Before the outage", main_category=CATEGORY)
            cluster.stop()
            for call in (
                lambda: client.get(added.id),
                lambda: client.search_by_image(before, k=1),
                lambda: client.add([during], title="During the outage", main_category=CATEGORY),
            ):
                with pytest.raises(grpc.RpcError) as raised:
                    call()
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()
                assert (
                    f"catalogue database postgresql://postgres@127.0.0.1:{cluster.port}/outage"
                    in raised.value.details()
                )
            cluster.start()
            deadline = time.monotonic() + 90
            while True:
                try:
                    assert client.get(added.id) == added
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                    assert time.monotonic() < deadline, "the gateway did not recover"
                    time.sleep(0.5)
            again = client.add([after], title="After the outage", main_category=CATEGORY)
            assert client.get(again.id) == again
            # (the shards are shared with the other tests here: twins of this photo from their
            # catalogues are dropped, so look a little further than the top hit)
            assert again.id in {r.listing.id for r in client.search_by_image(after, k=10)}
        assert gateway.process.poll() is None  # the same process throughout
    finally:
        if gateway is not None:
            gateway.stop()
        cluster.destroy()


# ----------------------------------------------------------------------------- crashes


class CrashingShard:
    """Wraps a real indexer store so the test can SIGKILL the gateway at chosen index writes:
    "before" (the catalogue committed, the shard not written: the write fails) or "after" (the
    shard wrote, the gateway dies before hearing it, so the entry is never marked done)."""

    def __init__(self, store, plan: dict[int, str]) -> None:
        self.plan = plan
        self.writes = 0
        self.kills: list[str] = []
        self.victim: int | None = None
        self.lock = threading.Lock()
        for name in ("upsert", "delete"):
            setattr(store, name, self._wrap(getattr(store, name), name))

    def _point(self) -> str | None:
        with self.lock:
            self.writes += 1
            return self.plan.get(self.writes)

    def _kill(self, point: str, method: str) -> None:
        if self.victim is not None:
            try:
                os.kill(self.victim, signal.SIGKILL)
                self.kills.append(f"{point} {method}")
            except ProcessLookupError:
                pass

    def _wrap(self, write, method: str):
        def wrapped(*args, **kwargs):
            point = self._point()
            if point == "before":
                self._kill(point, method)
                raise IndexerError("the gateway was killed before this write")
            result = write(*args, **kwargs)
            if point == "after":
                self._kill(point, method)
            return result

        return wrapped


def test_gateway_killed_anywhere_in_the_write_path_loses_and_orphans_nothing(services, postgres, tmp_path):
    root, embedder, _ = services
    rng = random.Random(1717)
    stores = [open_store(indexer_config(tmp_path, n)) for n in range(2)]
    plan = {n: rng.choice(["before", "after"]) for n in sorted(rng.sample(range(2, 90), 8))}
    crashing = [CrashingShard(store, plan) for store in stores]  # same plan, counted per shard
    shards = [start_indexer(indexer_config(tmp_path, n), store=store) for n, store in enumerate(stores)]
    url = postgres.create_database("crashes")
    env = gateway_env(url, embedder.port, shards, lease_s=4)  # a dead holder's entries move on soon
    port = free_port()
    images = photos(70)
    state = {"gateway": None, "restarts": 0, "client": None}
    failures: Counter = Counter()

    def ensure_gateway() -> GatewayClient:
        gateway = state["gateway"]
        if gateway is not None and gateway.process.poll() is None:
            return state["client"]
        if gateway is not None:
            gateway.process.wait()
            state["restarts"] += 1
            state["client"].close()  # a fresh channel: the old one is backing off from the dead one
        gateway = spawn("gateway", port, tmp_path / "gateway.log", env)
        wait_ready(gateway, 180)
        state["gateway"] = gateway
        state["client"] = GatewayClient(f"127.0.0.1:{port}", timeout=30)
        for shard in crashing:
            shard.victim = gateway.process.pid
        return state["client"]

    acknowledged_adds: set[str] = set()
    acknowledged_removes: set[str] = set()
    maybe_removed: set[str] = set()  # a remove that was not acknowledged may or may not have happened
    attempted: list[str] = []
    timer_kills = set(rng.sample(range(100), 4))  # plus kills at random moments of a call
    try:
        for op in range(100):
            client = ensure_gateway()
            if op in timer_kills:
                pid = state["gateway"].process.pid
                threading.Timer(rng.uniform(0.0, 0.3), lambda: _kill_quietly(pid)).start()
            removable = [i for i in attempted if i not in acknowledged_removes]
            if op % 10 >= 7 and removable:
                listing_id = rng.choice(removable)
                try:
                    client.remove(listing_id)
                    acknowledged_removes.add(listing_id)
                    acknowledged_adds.discard(listing_id)
                except grpc.RpcError as error:
                    failures[f"RemoveListing {error.code().name}"] += 1
                    maybe_removed.add(listing_id)  # not acknowledged: either outcome is allowed
            else:
                listing_id = f"crash-{op:03d}"
                attempted.append(listing_id)
                try:
                    client.add(
                        [images[len(attempted) - 1]],
                        title=f"Crash {op}",
                        main_category=CATEGORY,
                        listing_id=listing_id,
                    )
                    acknowledged_adds.add(listing_id)
                except grpc.RpcError as error:
                    failures[f"AddListing {error.code().name}"] += 1
            time.sleep(0.02)
        time.sleep(0.5)  # let a last timer kill land
        ensure_gateway()
        kills = [k for shard in crashing for k in shard.kills]
        assert any(k.startswith("before") for k in kills) and any(k.startswith("after") for k in kills)
        assert state["restarts"] >= 5
        print(
            f"crash test: {state['restarts']} restarts; kills at shard writes: {kills}; "
            f"{len(acknowledged_adds)} adds and {len(acknowledged_removes)} removes acknowledged; "
            f"failed calls: {dict(failures)}"
        )

        with Catalogue.open(url) as catalogue:
            end = time.monotonic() + 120
            while catalogue.pending_outbox() and time.monotonic() < end:
                time.sleep(0.2)
            assert catalogue.pending_outbox() == [], catalogue.outbox_stats()
            indexer = shards_client(shards)
            try:
                report = reconcile(catalogue, indexer)
            finally:
                indexer.close()
            assert (report.orphans, report.missing, report.pending) == (0, 0, 0), report.examples
            live = set(catalogue.listing_ids(include_pending=True))
            assert catalogue.count() == len(live)  # nothing left pending
            assert acknowledged_adds - maybe_removed <= live
            assert not acknowledged_removes & live
            assert len(acknowledged_adds) >= 30
    finally:
        if state["client"] is not None:
            state["client"].close()
        if state["gateway"] is not None:
            state["gateway"].stop()
        for shard in shards:
            shard.stop(None)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
