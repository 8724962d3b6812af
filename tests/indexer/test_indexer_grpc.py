"""The gRPC service in-process on an ephemeral port: round trips, congruence with the core, and
status codes asserted as (response, code, details)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from indexer_testutil import catalogue_attributes, ids_for, unit_vectors
from marketplace.indexer.v1 import indexer_pb2 as pb
from marketplace.indexer.v1 import indexer_pb2_grpc
from services.indexer.attributes import Attributes
from services.indexer.config import IndexerConfig
from services.indexer.filters import Condition
from services.indexer.server import SERVICE_NAME, attributes_to_proto, start
from services.indexer.spec import CollectionSpec

D = 16
N = 400
OK = grpc.StatusCode.OK
MiB = 1024 * 1024


def config_for(tmp_path, **overrides) -> IndexerConfig:
    settings = dict(
        host="127.0.0.1",
        port=0,
        data_dir=tmp_path,
        log_level="info",
        collections=(
            CollectionSpec("image", D),
            CollectionSpec("ivf", D, "ivf_flat", nlist=8),
            CollectionSpec("text", 4, "flat", "l2"),
        ),
        collections_explicit=True,
        snapshot_seconds=0,
        max_batch=64,
        max_k=100,
        max_message_bytes=1 * MiB,
    )
    settings.update(overrides)
    return IndexerConfig.local(**settings)


def call(method, request):
    """(response, code, details) of a unary call, so every test asserts on all three."""
    try:
        return method(request, timeout=10), OK, ""
    except grpc.RpcError as err:
        return None, err.code(), err.details()


def items_for(ids, vectors, attributes=None):
    attributes = attributes or [None] * len(ids)
    return [
        pb.Item(id=i, vector=v.tolist(), attributes=attributes_to_proto(a) if a else None)
        for i, v, a in zip(ids, vectors, attributes)
    ]


@pytest.fixture
def server(tmp_path):
    started = start(config_for(tmp_path))
    yield started
    started.stop(grace=None)


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield indexer_pb2_grpc.IndexerStub(channel)


@pytest.fixture
def loaded(server, stub):
    """The 'image' collection with N items in batches of 50."""
    ids, vectors, attrs = ids_for(N), unit_vectors(N, D, seed=1), catalogue_attributes(N)
    for s in range(0, N, 50):
        reply, code, details = call(
            stub.Upsert,
            pb.UpsertRequest(items=items_for(ids[s : s + 50], vectors[s : s + 50], attrs[s : s + 50])),
        )
        assert (code, details) == (OK, "") and reply.inserted == 50
    return ids, vectors, attrs


def test_reports_serving_on_health(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_upsert_search_fetch_delete_round_trip(stub, loaded):
    ids, vectors, attrs = loaded
    reply, code, _ = call(stub.Search, pb.SearchRequest(queries=[pb.Vector(values=vectors[3].tolist())], k=3))
    assert code == OK
    top = reply.results[0].neighbors[0]
    assert (top.id, top.attributes.listing_id, top.attributes.category) == (
        ids[3],
        attrs[3].listing_id,
        attrs[3].category,
    )
    assert top.score == pytest.approx(1.0, abs=1e-5)

    reply, code, _ = call(
        stub.Upsert, pb.UpsertRequest(items=items_for([ids[3]], unit_vectors(1, D, seed=5)))
    )
    assert (code, reply.inserted, reply.replaced) == (OK, 0, 1)

    reply, code, _ = call(stub.Fetch, pb.FetchRequest(ids=[ids[3], ids[9], "missing"]))
    assert (
        code == OK
        and [i.id for i in reply.items] == [ids[3], ids[9]]
        and list(reply.not_found) == ["missing"]
    )
    np.testing.assert_allclose(reply.items[0].vector, unit_vectors(1, D, seed=5)[0], atol=1e-6)
    assert not reply.items[0].attributes.HasField("price")  # replaced without attributes
    assert attrs[9].price is None and not reply.items[1].attributes.HasField("price")  # every 10th is unknown

    reply, code, _ = call(stub.Delete, pb.DeleteRequest(ids=[ids[3], "missing"]))
    assert (code, reply.deleted, list(reply.not_found)) == (OK, 1, ["missing"])
    reply, code, _ = call(stub.GetStats, pb.GetStatsRequest(collection="image"))
    assert code == OK
    assert reply.collections[0] == pb.CollectionStats(
        name="image", count=N - 1, dimension=D, index_type="flat", metric="ip"
    )


def test_unset_price_stays_unset_and_zero_price_stays_zero(stub):
    attrs = [Attributes(listing_id="free", price=0.0), None]
    call(stub.Upsert, pb.UpsertRequest(items=items_for(["free", "unknown"], unit_vectors(2, D), attrs)))
    reply, _, _ = call(stub.Fetch, pb.FetchRequest(ids=["free", "unknown"]))
    assert reply.items[0].attributes.HasField("price") and reply.items[0].attributes.price == 0.0
    assert not reply.items[1].attributes.HasField("price")


SEARCHES = [
    dict(k=10),
    dict(
        k=7,
        filter=pb.Filter(
            must=[
                pb.Condition(field="category", equals="Music"),
                pb.Condition(field="price", range=pb.Range(gte=50, lte=300)),
            ]
        ),
    ),
    dict(
        k=10,
        filter=pb.Filter(must=[pb.Condition(field="listing_id", none_of=pb.StringList(values=["L1", "L2"]))]),
        group_by_listing=True,
    ),
]
CORE_CONDITIONS = [
    [],
    [Condition.equals("category", "Music"), Condition.range("price", 50, 300)],
    [Condition.none_of("listing_id", ["L1", "L2"])],
]


@pytest.mark.parametrize("case", range(len(SEARCHES)))
def test_grpc_and_in_process_core_give_identical_results(server, stub, loaded, case):
    queries = unit_vectors(5, D, seed=7)
    request = pb.SearchRequest(queries=[pb.Vector(values=q.tolist()) for q in queries], **SEARCHES[case])
    reply, code, details = call(stub.Search, request)
    assert (code, details) == (OK, "")
    core = server.store.collection("image").search(
        queries,
        SEARCHES[case]["k"],
        CORE_CONDITIONS[case],
        group_by_listing=SEARCHES[case].get("group_by_listing", False),
    )
    over_grpc = [[(n.id, n.score, n.attributes) for n in r.neighbors] for r in reply.results]
    in_process = [
        [(h.id, np.float32(h.score), attributes_to_proto(h.attributes)) for h in row] for row in core
    ]
    assert over_grpc == in_process
    assert all(len(row) == SEARCHES[case]["k"] for row in over_grpc)


def test_ivf_search_params_are_checked_against_the_collection(stub):
    vectors = unit_vectors(60, D, seed=8)
    call(stub.Upsert, pb.UpsertRequest(collection="ivf", items=items_for(ids_for(60), vectors)))
    query = [pb.Vector(values=vectors[0].tolist())]
    reply, code, _ = call(
        stub.Search,
        pb.SearchRequest(
            collection="ivf", queries=query, k=5, params=pb.SearchParams(nprobe=4, ef_search=32)
        ),
    )
    assert code == OK and reply.results[0].neighbors[0].id == ids_for(1)[0]


def vec(n=1, d=D):
    return [pb.Vector(values=v.tolist()) for v in unit_vectors(n, d, seed=3)]


@pytest.mark.parametrize(
    "method,request_,code,fragment",
    [
        (
            "Upsert",
            pb.UpsertRequest(items=[pb.Item(id="a", vector=[1.0] * (D + 1))]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dimension 17",
        ),
        (
            "Upsert",
            pb.UpsertRequest(items=[pb.Item(id="a", vector=[1.0] * D), pb.Item(id="b", vector=[1.0] * 3)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "item 1 has dimension 3",
        ),
        (
            "Upsert",
            pb.UpsertRequest(items=[pb.Item(id="a", vector=[float("nan")] * D)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "non-finite",
        ),
        (
            "Upsert",
            pb.UpsertRequest(items=[pb.Item(id="", vector=[1.0] * D)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "non-empty",
        ),
        (
            "Upsert",
            pb.UpsertRequest(items=[pb.Item(id=f"i{n}", vector=[1.0] * D) for n in range(65)]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "limit is 64",
        ),
        (
            "Upsert",
            pb.UpsertRequest(collection="nope", items=[pb.Item(id="a", vector=[1.0] * D)]),
            grpc.StatusCode.NOT_FOUND,
            "collection 'nope' does not exist",
        ),
        (
            "Search",
            pb.SearchRequest(queries=vec(), k=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "k must be in 1..100",
        ),
        (
            "Search",
            pb.SearchRequest(queries=vec(), k=101),
            grpc.StatusCode.INVALID_ARGUMENT,
            "k must be in 1..100",
        ),
        ("Search", pb.SearchRequest(k=5), grpc.StatusCode.INVALID_ARGUMENT, "at least one query"),
        ("Search", pb.SearchRequest(queries=vec(65), k=5), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit is 64"),
        (
            "Search",
            pb.SearchRequest(queries=vec(1, D - 2), k=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "query 0 has dimension 14",
        ),
        (
            "Search",
            pb.SearchRequest(
                queries=vec(), k=5, filter=pb.Filter(must=[pb.Condition(field="colour", equals="red")])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown filter field 'colour'",
        ),
        (
            "Search",
            pb.SearchRequest(queries=vec(), k=5, filter=pb.Filter(must=[pb.Condition(field="category")])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "cannot use 'no operator'",
        ),
        (
            "Search",
            pb.SearchRequest(
                queries=vec(), k=5, filter=pb.Filter(must=[pb.Condition(field="price", equals="3")])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "cannot use 'equals'",
        ),
        (
            "Search",
            pb.SearchRequest(collection="nope", queries=vec(), k=5),
            grpc.StatusCode.NOT_FOUND,
            "'nope'",
        ),
        (
            "Search",
            pb.SearchRequest(queries=vec(), k=5, params=pb.SearchParams(ef_search=5000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ef_search must be in 1..4096",
        ),
        (
            "Delete",
            pb.DeleteRequest(ids=["missing"], strict=True),
            grpc.StatusCode.NOT_FOUND,
            "nothing was deleted",
        ),
        (
            "Delete",
            pb.DeleteRequest(ids=[f"i{n}" for n in range(65)]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "limit is 64",
        ),
        ("Fetch", pb.FetchRequest(collection="nope", ids=["a"]), grpc.StatusCode.NOT_FOUND, "'nope'"),
        ("GetStats", pb.GetStatsRequest(collection="nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
    ],
)
def test_errors_map_to_status_codes(stub, loaded, method, request_, code, fragment):
    reply, got_code, details = call(getattr(stub, method), request_)
    assert (reply, got_code) == (None, code)
    assert fragment in details


def test_non_strict_delete_reports_unknown_ids(stub, loaded):
    reply, code, details = call(stub.Delete, pb.DeleteRequest(ids=["missing", loaded[0][0]]))
    assert (code, details, reply.deleted, list(reply.not_found)) == (OK, "", 1, ["missing"])


def test_strict_delete_with_an_unknown_id_deletes_nothing(stub, loaded):
    ids = loaded[0]
    reply, code, _ = call(stub.Delete, pb.DeleteRequest(ids=[ids[0], "missing"], strict=True))
    assert (reply, code) == (None, grpc.StatusCode.NOT_FOUND)
    reply, _, _ = call(stub.Fetch, pb.FetchRequest(ids=[ids[0]]))
    assert [i.id for i in reply.items] == [ids[0]]


def test_message_over_the_size_limit_is_resource_exhausted(stub):
    big = pb.UpsertRequest(items=[pb.Item(id=f"i{n}", vector=[0.5] * 8192) for n in range(40)])  # ~1.3 MiB
    reply, code, details = call(stub.Upsert, big)
    assert (reply, code) == (None, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "larger than max" in details or "message" in details.lower()


def test_get_stats_lists_every_collection(stub):
    reply, code, _ = call(stub.GetStats, pb.GetStatsRequest())
    assert code == OK
    assert [(c.name, c.dimension, c.index_type, c.metric) for c in reply.collections] == [
        ("image", D, "flat", "ip"),
        ("ivf", D, "ivf_flat", "ip"),
        ("text", 4, "flat", "l2"),
    ]


def test_l2_scores_are_negative_squared_distances(stub):
    call(
        stub.Upsert,
        pb.UpsertRequest(
            collection="text",
            items=[pb.Item(id="a", vector=[1, 2, 3, 4]), pb.Item(id="b", vector=[0, 0, 0, 0])],
        ),
    )
    reply, code, _ = call(
        stub.Search, pb.SearchRequest(collection="text", queries=[pb.Vector(values=[1, 2, 3, 3])], k=2)
    )
    assert code == OK
    assert [(n.id, n.score) for n in reply.results[0].neighbors] == [("a", -1.0), ("b", -23.0)]


def test_writes_need_the_write_token_when_one_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("WRITE_TOKEN", "s3cret")
    started = start(config_for(tmp_path))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{started.port}") as channel:
            stub = indexer_pb2_grpc.IndexerStub(channel)
            request = pb.UpsertRequest(items=items_for(["a"], unit_vectors(1, D)))
            assert call(stub.Upsert, request)[1] == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Upsert(request, metadata=(("authorization", "Bearer s3cret"),), timeout=5)
            assert reply.inserted == 1
            reply, code, _ = call(stub.Search, pb.SearchRequest(queries=vec(), k=1))  # reads stay open
            assert code == OK and len(reply.results[0].neighbors) == 1
    finally:
        started.stop(grace=None)


def test_restart_in_process_keeps_acknowledged_writes(tmp_path):
    first = start(config_for(tmp_path))
    with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        stub = indexer_pb2_grpc.IndexerStub(channel)
        call(stub.Upsert, pb.UpsertRequest(items=items_for(["kept"], unit_vectors(1, D))))
    first.stop(grace=None)  # final snapshot
    second = start(config_for(tmp_path))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            reply, code, _ = call(indexer_pb2_grpc.IndexerStub(channel).Fetch, pb.FetchRequest(ids=["kept"]))
            assert code == OK and [i.id for i in reply.items] == ["kept"]
    finally:
        second.stop(grace=None)


def test_list_ids_pages_through_every_id_in_order(stub, loaded):
    ids, _, attrs = loaded
    owner = {i: a.listing_id for i, a in zip(ids, attrs)}
    call(stub.Delete, pb.DeleteRequest(ids=[ids[7]]))
    seen, token, pages = [], "", 0
    while True:
        reply, code, details = call(stub.ListIds, pb.ListIdsRequest(page_size=64, page_token=token))
        assert (code, details) == (OK, "") and len(reply.ids) <= 64
        seen += [(entry.id, entry.listing_id) for entry in reply.ids]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    expected = sorted((i, owner[i]) for i in ids if i != ids[7])
    assert seen == expected and pages == -(-len(expected) // 64)
    reply, code, _ = call(stub.ListIds, pb.ListIdsRequest(collection="text"))
    assert code == OK and list(reply.ids) == [] and reply.next_page_token == ""


def test_list_ids_bad_requests(stub):
    _, code, details = call(stub.ListIds, pb.ListIdsRequest(page_size=65))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "64" in details
    _, code, details = call(stub.ListIds, pb.ListIdsRequest(collection="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
