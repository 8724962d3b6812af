"""The in-process core (VectorIndex): exactness against numpy, upsert/delete semantics, filters
inside FAISS, grouping by listing, validation, tombstones, compaction and concurrency."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from indexer_testutil import brute_force, catalogue_attributes, ids_for, unit_vectors
from services.indexer.attributes import Attributes
from services.indexer.errors import InvalidArgument, NotFound
from services.indexer.filters import Condition
from services.indexer.spec import CollectionSpec
from services.indexer import vector_index
from services.indexer.vector_index import VectorIndex

N, D = 1500, 24
TYPES = ["flat", "ivf_flat", "hnsw"]


def make_index(index_type: str = "flat", metric: str = "ip", n: int = N, d: int = D, **options) -> tuple:
    db = (
        unit_vectors(n, d, seed=1)
        if metric == "ip"
        else np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    )
    spec = CollectionSpec("image", d, index_type, metric, **options)
    ids = ids_for(n)
    index = VectorIndex.build(spec, ids, db, catalogue_attributes(n))
    return index, db, ids


def result_ids(hits) -> list[str]:
    return [h.id for h in hits]


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_search_equals_numpy_brute_force(metric):
    index, db, ids = make_index("flat", metric)
    queries = (
        unit_vectors(20, D, seed=2)
        if metric == "ip"
        else np.random.default_rng(2).normal(size=(20, D)).astype(np.float32)
    )
    rows, scores = brute_force(db, queries, 10, metric)
    results = index.search(queries, 10)
    for q, hits in enumerate(results):
        assert result_ids(hits) == [ids[r] for r in rows[q]]
        np.testing.assert_allclose([h.score for h in hits], scores[q], rtol=1e-4, atol=1e-4)


def test_ivf_probing_every_list_is_exact():
    index, db, ids = make_index("ivf_flat", nlist=16)
    assert index.trained and index.nlist == 16
    queries = unit_vectors(20, D, seed=3)
    rows, _ = brute_force(db, queries, 10)
    results = index.search(queries, 10, nprobe=16)
    assert [result_ids(h) for h in results] == [[ids[r] for r in row] for row in rows]


def test_hnsw_recall_is_high():
    index, db, ids = make_index("hnsw", ef_search=128)
    queries = unit_vectors(50, D, seed=4)
    rows, _ = brute_force(db, queries, 10)
    results = index.search(queries, 10)
    recall = np.mean([len(set(result_ids(h)) & {ids[r] for r in row}) / 10 for h, row in zip(results, rows)])
    assert recall >= 0.95


@pytest.mark.parametrize("index_type", TYPES)
def test_upsert_replaces_vector_and_attributes(index_type):
    index, db, ids = make_index(index_type, nlist=8)
    new_vector = unit_vectors(1, D, seed=99)[0]
    result = index.upsert(
        [ids[5], "brand-new"],
        [new_vector, db[0]],
        [Attributes("L-new", "Music", 12.5, "Leeds"), Attributes()],
    )
    assert (result.inserted, result.replaced) == (1, 1)
    assert index.count == N + 1
    top = index.search(new_vector, 1)[0][0]
    assert (top.id, top.attributes) == (ids[5], Attributes("L-new", "Music", 12.5, "Leeds"))
    assert top.score == pytest.approx(1.0, abs=1e-5)
    old_hits = index.search(db[5], 3)[0]
    assert ids[5] not in result_ids(old_hits)  # the old vector is gone
    items, missing = index.fetch([ids[5], "nope"])
    assert missing == ["nope"]
    np.testing.assert_allclose(items[0].vector, new_vector, atol=1e-6)


@pytest.mark.parametrize("index_type", TYPES)
def test_delete_removes_items(index_type):
    index, db, ids = make_index(index_type, nlist=8)
    result = index.delete([ids[0], ids[1], "unknown"])
    assert (result.deleted, result.not_found) == (2, ["unknown"])
    assert index.count == N - 2
    hits = index.search(db[:2], 5)
    assert not {ids[0], ids[1]} & {h.id for row in hits for h in row}
    assert index.fetch([ids[0]]) == ([], [ids[0]])


def test_strict_delete_of_unknown_id_deletes_nothing():
    index, _, ids = make_index()
    with pytest.raises(NotFound, match="nothing was deleted"):
        index.delete([ids[0], "unknown"], strict=True)
    assert index.count == N and index.contains(ids[0])


def _allowed(attributes, predicate) -> np.ndarray:
    return np.array([predicate(a) for a in attributes])


FILTERS = [
    (
        [Condition.equals("category", "Music"), Condition.range("price", 100, 900)],
        lambda a: a.category == "Music" and a.price is not None and 100 <= a.price <= 900,
    ),
    (
        [
            Condition.none_of("listing_id", ["L0", "L1", "L2"]),
            Condition.any_of("category", ["Sports", "Clothes"]),
        ],
        lambda a: a.listing_id not in {"L0", "L1", "L2"} and a.category in {"Sports", "Clothes"},
    ),
    ([Condition.range("price", gte=1200)], lambda a: a.price is not None and a.price >= 1200),
    ([Condition.equals("location", "Town 3")], lambda a: a.location == "Town 3"),
]


@pytest.mark.parametrize("conditions,predicate", FILTERS)
def test_flat_filters_equal_brute_force_over_matching_items(conditions, predicate):
    index, db, ids = make_index()
    allowed = _allowed(catalogue_attributes(N), predicate)
    assert allowed.sum() >= 10
    queries = unit_vectors(10, D, seed=5)
    rows, _ = brute_force(db, queries, 10, allowed=allowed)
    results = index.search(queries, 10, conditions)
    assert [result_ids(h) for h in results] == [[ids[r] for r in row] for row in rows]


@pytest.mark.parametrize("index_type", TYPES)
@pytest.mark.parametrize("conditions,predicate", FILTERS)
def test_filters_return_only_matching_items_and_k_of_them(index_type, conditions, predicate):
    index, _, _ = make_index(index_type, nlist=16, nprobe=2)
    results = index.search(unit_vectors(10, D, seed=6), 10, conditions)
    for hits in results:
        assert len(hits) == 10
        assert all(predicate(h.attributes) for h in hits)


@pytest.mark.parametrize("index_type", TYPES)
def test_very_selective_filter_still_returns_every_match_exactly(index_type):
    index, db, ids = make_index(index_type, nlist=32, nprobe=1)
    wanted = ids[::100]  # 15 items scattered over the catalogue
    allowed = np.isin(np.array(ids), wanted)
    queries = unit_vectors(5, D, seed=7)
    rows, _ = brute_force(db, queries, 12, allowed=allowed)
    results = index.search(queries, 12, [Condition.any_of("id", wanted)])
    assert [result_ids(h) for h in results] == [[ids[r] for r in row] for row in rows]
    assert len(index.search(queries, 50, [Condition.any_of("id", wanted)])[0]) == 15


def test_filter_matching_nothing_returns_empty_lists():
    index, _, _ = make_index()
    assert index.search(unit_vectors(2, D), 5, [Condition.equals("category", "Cars")]) == [[], []]


@pytest.mark.parametrize("index_type", TYPES)
def test_group_by_listing_returns_best_image_of_k_distinct_listings(index_type):
    index, db, ids = make_index(index_type, nlist=8, nprobe=8, ef_search=256)
    attributes = catalogue_attributes(N)
    queries = unit_vectors(8, D, seed=8)
    rows, _ = brute_force(db, queries, N)
    for hits, row in zip(index.search(queries, 10, group_by_listing=True), rows):
        listings = [h.attributes.listing_id for h in hits]
        assert len(hits) == 10 and len(set(listings)) == 10
        if index_type == "flat":  # exact: the best image of each of the 10 best listings
            expected, seen = [], set()
            for r in row:
                if attributes[r].listing_id not in seen:
                    seen.add(attributes[r].listing_id)
                    expected.append(ids[r])
            assert result_ids(hits) == expected[:10]


def test_group_by_listing_goes_deeper_when_one_listing_dominates():
    d = 8
    near = unit_vectors(1, d, seed=9)[0]
    crowd = near + 0.01 * unit_vectors(60, d, seed=10)  # 60 images of one listing around the query
    others = unit_vectors(200, d, seed=11)
    spec = CollectionSpec("image", d)
    ids = ids_for(260)
    attrs = [Attributes("crowd")] * 60 + [Attributes(f"L{i}") for i in range(200)]
    index = VectorIndex.build(spec, ids, np.vstack([crowd, others]), attrs)
    hits = index.search(near, 5, group_by_listing=True)[0]
    assert len(hits) == 5 and hits[0].attributes.listing_id == "crowd"
    assert len({h.attributes.listing_id for h in hits}) == 5


def test_hnsw_tombstones_are_never_returned_and_compaction_keeps_results():
    index, db, ids = make_index("hnsw")
    index.delete(ids[:300])
    index.upsert(ids[300:320], db[300:320] * -1)  # replacements leave tombstones too
    assert index.dead_count == 320 and index.count == N - 300
    queries = np.vstack([db[:20], unit_vectors(5, D, seed=12)])
    before = index.search(queries, 10)
    assert not set(ids[:300]) & {h.id for row in before for h in row}
    assert index.compact() and index.dead_count == 0 and index.slot_count == N - 300
    after = index.search(queries, 10)
    assert not set(ids[:300]) & {h.id for row in after for h in row}
    overlap = np.mean([len(set(result_ids(a)) & set(result_ids(b))) / 10 for a, b in zip(before, after)])
    assert overlap >= 0.9


@pytest.mark.parametrize("index_type", ["flat", "ivf_flat"])
def test_compaction_renumbers_without_changing_results(index_type):
    index, db, ids = make_index(index_type, nlist=8, nprobe=8)
    index.delete(ids[::3])
    queries = unit_vectors(10, D, seed=13)
    before = [result_ids(h) for h in index.search(queries, 10, [Condition.equals("category", "Music")])]
    assert index.compact()
    assert index.slot_count == index.count == N - len(ids[::3])
    after = [result_ids(h) for h in index.search(queries, 10, [Condition.equals("category", "Music")])]
    assert before == after
    items, _ = index.fetch([ids[1]])
    np.testing.assert_allclose(items[0].vector, db[1], atol=1e-6)


def test_ivf_collection_trains_itself_once_enough_vectors_arrive(monkeypatch):
    monkeypatch.setattr(vector_index, "MIN_ONLINE_TRAIN", 2000)
    d = 8
    index = VectorIndex(CollectionSpec("image", d, "ivf_flat", nprobe=50))
    db = unit_vectors(3000, d, seed=14)
    ids = ids_for(3000)
    for start in range(0, 3000, 500):
        index.upsert(ids[start : start + 500], db[start : start + 500])
        assert index.trained == (start + 500 >= 2000)
    assert index.count == 3000 and index.nlist == 45  # trained at 2000 vectors: about sqrt(2000) lists
    queries = unit_vectors(10, d, seed=15)
    rows, _ = brute_force(db, queries, 5)
    exact = [result_ids(h) for h in index.search(queries, 5, nprobe=index.nlist)]
    assert exact == [[ids[r] for r in row] for row in rows]


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda ix: ix.upsert(["a"], np.ones((1, D + 1))), "dimension 25"),
        (lambda ix: ix.upsert(["a"], np.full((1, D), np.nan)), "non-finite"),
        (lambda ix: ix.upsert(["a"], np.zeros((1, D))), "all zeros"),
        (lambda ix: ix.upsert(["a", "a"], np.ones((2, D))), "appears twice"),
        (lambda ix: ix.upsert([""], np.ones((1, D))), "non-empty"),
        (lambda ix: ix.upsert(["x" * 257], np.ones((1, D))), "256 bytes"),
        (lambda ix: ix.upsert(["a"], np.ones((1, D)), [Attributes(price=float("inf"))]), "price"),
        (lambda ix: ix.search(np.ones(D), 0), "k must be"),
        (lambda ix: ix.search(np.ones(D - 1), 5), "dimension 23"),
        (
            lambda ix: ix.search(np.ones(D), 5, [Condition("colour", "equals", ("red",))]),
            "unknown filter field",
        ),
        (lambda ix: ix.search(np.ones(D), 5, [Condition("price", "equals", ("1",))]), "cannot use"),
        (lambda ix: ix.search(np.ones(D), 5, [Condition("category", "range")]), "cannot use"),
        (lambda ix: ix.search(np.ones(D), 5, ef_search=5000), "ef_search"),
    ],
)
def test_invalid_input_is_rejected_and_changes_nothing(call, message):
    index, _, _ = make_index()
    with pytest.raises(InvalidArgument, match=message):
        call(index)
    assert index.count == N


def test_nprobe_outside_the_list_count_is_rejected():
    index, _, _ = make_index("ivf_flat", nlist=8)
    with pytest.raises(InvalidArgument, match="nprobe must be in 1..8"):
        index.search(np.ones(D), 5, nprobe=9)


def test_searches_never_see_half_a_batch():
    """A writer keeps rewriting one listing's 20 images with a new price per batch; readers
    must always see all 20 with the same price."""
    d = 16
    spec = CollectionSpec("image", d)
    base = unit_vectors(20, d, seed=16)
    ids = ids_for(20)
    index = VectorIndex.build(
        spec,
        ids + ids_for(500, "other"),
        np.vstack([base, unit_vectors(500, d, seed=17)]),
        [Attributes("L", price=0.0)] * 20 + [Attributes("O")] * 500,
    )
    stop = threading.Event()
    problems: list[str] = []

    def writer():
        generation = 0
        while not stop.is_set():
            generation += 1
            index.upsert(ids, base, [Attributes("L", price=float(generation))] * 20)

    def reader():
        while not stop.is_set():
            hits = index.search(base[:2], 20, [Condition.equals("listing_id", "L")])
            for row in hits:
                prices = {h.attributes.price for h in row}
                if len(row) != 20 or len(prices) != 1:
                    problems.append(f"{len(row)} hits, prices {sorted(prices)}")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    threading.Event().wait(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert problems == []
    assert index.count == 520 and index.dead_count > 0
