"""The gateway's fast tests run against ``FakeIndexer``; this checks that fake against the real
indexer servicer (an in-memory ``IndexStore``) call by call, over gRPC, so a difference in
filtering, grouping, ordering or collection handling fails here instead of hiding a gateway bug.

Both servers get the same requests; the responses must be equal (scores to float tolerance).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from services.indexer.core import IndexStore
from services.indexer.server import IndexerServicer, SERVICE_NAME
from services.indexer.spec import CollectionSpec
from common.serving import create_server
from tests.gateway.gateway_fakes import DIM, FakeIndexer, serve_indexer

COLLECTIONS = ("image", "text")


def _serve_real() -> object:
    store = IndexStore.in_memory([CollectionSpec(name, DIM) for name in COLLECTIONS])
    servicer = IndexerServicer(store)

    def register(server):
        indexer_pb2_grpc.add_IndexerServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    server = create_server(register, "127.0.0.1:0")
    server.set_serving(True)
    return server


@pytest.fixture(scope="module")
def stubs():
    fake = serve_indexer(FakeIndexer())
    real = _serve_real()
    channels = [grpc.insecure_channel(f"127.0.0.1:{s.port}") for s in (fake, real)]
    yield [indexer_pb2_grpc.IndexerStub(c) for c in channels]
    for channel in channels:
        channel.close()
    fake.stop(0)
    real.stop(0)


def _unit(rng: np.random.Generator) -> list[float]:
    vector = rng.standard_normal(DIM).astype(np.float32)
    return (vector / np.linalg.norm(vector)).tolist()


def _items(prefix: str, count: int, seed: int) -> list[indexer_pb2.Item]:
    """Photos of listings L0..: three photos a listing, four categories, every 5th price unknown."""
    rng = np.random.default_rng(seed)
    categories = ("Appliances", "Home & Garden", "Other Goods", "Baby & Kids Stuff")
    items = []
    for i in range(count):
        attributes = indexer_pb2.Attributes(
            listing_id=f"L{i // 3}", category=categories[i % 4], location=f"Town {i % 3}"
        )
        if i % 5:
            attributes.price = float(i * 7 % 53)
        items.append(indexer_pb2.Item(id=f"{prefix}{i:03d}", vector=_unit(rng), attributes=attributes))
    return items


def _same(responses: list, what: str) -> None:
    fake, real = responses
    if isinstance(fake, indexer_pb2.SearchResponse):
        for q, (f_list, r_list) in enumerate(zip(fake.results, real.results, strict=True)):
            assert [n.id for n in f_list.neighbors] == [n.id for n in r_list.neighbors], f"{what}, query {q}"
            assert np.allclose(
                [n.score for n in f_list.neighbors], [n.score for n in r_list.neighbors], atol=1e-5
            ), f"{what}, query {q}"
            assert [n.attributes for n in f_list.neighbors] == [n.attributes for n in r_list.neighbors]
        assert len(fake.results) == len(real.results)
        return
    if isinstance(fake, indexer_pb2.FetchResponse):  # the real indexer stores re-normalised floats
        assert [(i.id, i.attributes) for i in fake.items] == [(i.id, i.attributes) for i in real.items], what
        assert all(np.allclose(f.vector, r.vector, atol=1e-6) for f, r in zip(fake.items, real.items)), what
        assert list(fake.not_found) == list(real.not_found), what
        return
    assert fake == real, f"{what}: fake {fake} != real {real}"


def _both(stubs, method: str, request, what: str):
    responses = [getattr(stub, method)(request, timeout=10) for stub in stubs]
    _same(responses, what)
    return responses[1]


def _condition(field: str, **op) -> indexer_pb2.Condition:
    condition = indexer_pb2.Condition(field=field)
    if "equals" in op:
        condition.equals = op["equals"]
    elif "any_of" in op:
        condition.any_of.values.extend(op["any_of"])
    elif "none_of" in op:
        condition.none_of.values.extend(op["none_of"])
    else:
        condition.range.CopyFrom(indexer_pb2.Range(**op))
    return condition


def test_fake_indexer_answers_like_the_real_one(stubs) -> None:
    # Same ids in two collections: the collections are separate spaces on the real indexer.
    image_items = _items("p", 30, seed=1)
    text_items = [
        indexer_pb2.Item(
            id=f"p{i:03d}", vector=_unit(np.random.default_rng(100 + i)), attributes=image_items[i].attributes
        )
        for i in range(0, 30, 3)
    ]
    _both(stubs, "Upsert", indexer_pb2.UpsertRequest(collection="image", items=image_items), "upsert image")
    _both(stubs, "Upsert", indexer_pb2.UpsertRequest(collection="text", items=text_items), "upsert text")
    # A second upsert of some ids replaces them.
    replaced = _both(
        stubs, "Upsert", indexer_pb2.UpsertRequest(collection="image", items=image_items[:4]), "upsert again"
    )
    assert (replaced.inserted, replaced.replaced) == (0, 4)

    rng = np.random.default_rng(7)
    queries = [indexer_pb2.Vector(values=_unit(rng)) for _ in range(3)]
    filters = {
        "none": [],
        "price range": [_condition("price", gte=10.0, lte=40.0)],
        "category": [_condition("category", equals="Home & Garden")],
        "any_of listings": [_condition("listing_id", any_of=["L1", "L4", "L7"])],
        "none_of ids": [_condition("id", none_of=["p000", "p001", "p002", "p010"])],
        "two conditions": [
            _condition("category", any_of=["Appliances", "Other Goods"]),
            _condition("price", lte=30.0),
        ],
    }
    for collection in COLLECTIONS:
        for name, must in filters.items():
            for group in (False, True):
                request = indexer_pb2.SearchRequest(
                    collection=collection,
                    queries=queries,
                    k=7,
                    group_by_listing=group,
                    filter=indexer_pb2.Filter(must=must),
                )
                _both(stubs, "Search", request, f"search {collection}, {name}, group={group}")

    fetch = indexer_pb2.FetchRequest(collection="text", ids=["p000", "p001", "p003", "nope"])
    fetched = _both(stubs, "Fetch", fetch, "fetch text")
    assert [i.id for i in fetched.items] == ["p000", "p003"] and list(fetched.not_found) == ["p001", "nope"]

    _both(
        stubs, "Delete", indexer_pb2.DeleteRequest(collection="image", ids=["p000", "p001", "zzz"]), "delete"
    )
    # Deleting from "image" leaves "text" alone.
    _both(stubs, "Fetch", indexer_pb2.FetchRequest(collection="text", ids=["p000"]), "fetch after delete")
    _both(
        stubs,
        "Search",
        indexer_pb2.SearchRequest(collection="image", queries=queries, k=5),
        "search after delete",
    )
    stats = [stub.GetStats(indexer_pb2.GetStatsRequest(collection="image"), timeout=10) for stub in stubs]
    assert [c.count for c in stats[0].collections] == [c.count for c in stats[1].collections] == [28]
    for collection in COLLECTIONS:  # every id with its listing, paged, as reconcile reads them
        token = ""
        while True:
            page = _both(
                stubs,
                "ListIds",
                indexer_pb2.ListIdsRequest(collection=collection, page_size=7, page_token=token),
                f"list ids {collection} after {token!r}",
            )
            token = page.next_page_token
            if not token:
                break
