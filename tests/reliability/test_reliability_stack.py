"""Bad input, access control, request tracing, bounded load and faults against the real stack:
the embedder (test artefact), two indexer shards and the gateway as subprocesses on loopback
(`suite.Stack`), sized for the default test run. ``python -m benchmarks.reliability`` runs the
same functions at a larger size.

Figures (printed with ``-s``, in the "reliability figures" summary section, and as JUnit
properties): requests sent, failed, bad inputs tried, acknowledged writes lost.
"""

from __future__ import annotations

import json
import secrets
import time

import grpc
import pytest

from marketplace.gateway.v1 import gateway_pb2
from marketplace.indexer.v1 import indexer_pb2
from tests.reliability.suite import (
    EMBEDDER,
    GATEWAY,
    INDEXER,
    OK,
    describe_faults,
    describe_fuzz,
    describe_load,
    figures,
    mib,
    report,
    result_line,
    run_faults,
    run_fuzz,
    run_load,
)

pytestmark = pytest.mark.timeout(300)
CODE = grpc.StatusCode
RESULTS: dict = {}


# ------------------------------------------------------------------------------ bad input


def test_fuzz_every_rpc_gets_a_precise_status_and_service_continues(stack, record_property):
    stats = run_fuzz(stack, random_rounds=1, max_seconds=120)
    RESULTS["fuzz"] = stats
    report(record_property, "fuzz", describe_fuzz(stats), bad_inputs=stats.bad_inputs)
    assert stats.bad_inputs >= 150
    assert stats.imprecise == [], "\n".join(stats.imprecise)
    assert stats.followups_failed == [], "\n".join(stats.followups_failed)
    assert stats.followups_ok == stats.bad_inputs


# ------------------------------------------------------------------------------ access control


def _auth_cases(stack, call, request):
    """(no token, wrong token, other scheme, right token) -> codes and details."""
    results = {}
    for name, metadata in (
        ("none", ()),
        ("wrong", (("authorization", "Bearer nope"),)),
        ("wrong, same length", (("authorization", "Bearer " + "x" * len(stack.token)),)),
        ("basic", (("authorization", f"Basic {stack.token}"),)),
    ):
        code, details, _ = call(request, metadata=metadata)
        results[name] = (code, details)
    return results


def test_indexer_writes_need_the_token_reads_are_open(stack):
    vector = stack.good_vector()
    upsert = indexer_pb2.UpsertRequest(
        collection="image",
        items=[
            indexer_pb2.Item(
                id="auth-probe", vector=vector, attributes=indexer_pb2.Attributes(listing_id="auth-probe")
            )
        ],
    )
    delete = indexer_pb2.DeleteRequest(collection="image", ids=["auth-probe"])
    for method, request in (("Upsert", upsert), ("Delete", delete)):
        denied = _auth_cases(stack, lambda r, **kw: stack.indexer(0, method, r, **kw), request)
        assert denied["none"][0] == CODE.UNAUTHENTICATED and "Bearer" in denied["none"][1]
        assert denied["basic"][0] == CODE.UNAUTHENTICATED
        assert denied["wrong"][0] == CODE.PERMISSION_DENIED
        assert denied["wrong, same length"][0] == CODE.PERMISSION_DENIED
        assert all(stack.token not in details for _, details in denied.values())
    fetch = indexer_pb2.FetchRequest(collection="image", ids=["auth-probe"])
    assert list(indexer_pb2.FetchResponse.FromString(stack.indexer(0, "Fetch", fetch)[2]).not_found) == [
        "auth-probe"
    ]  # nothing a denied Upsert sent was stored
    assert stack.indexer(0, "Upsert", upsert, write=True)[0] == OK
    # reads need no token
    assert stack.indexer(0, "Fetch", fetch)[0] == OK
    assert stack.indexer(0, "GetStats", indexer_pb2.GetStatsRequest())[0] == OK
    assert (
        stack.indexer(
            0,
            "Search",
            indexer_pb2.SearchRequest(collection="image", k=1, queries=[indexer_pb2.Vector(values=vector)]),
        )[0]
        == OK
    )
    assert stack.indexer(0, "Delete", delete, write=True)[0] == OK


def test_gateway_writes_need_the_token_reads_are_open(stack):
    listing_id = f"auth-{secrets.token_hex(4)}"
    add = gateway_pb2.AddListingRequest(
        listing=gateway_pb2.Listing(id=listing_id, title="auth"), images=[stack.photos[4]]
    )
    remove = gateway_pb2.RemoveListingRequest(listing_id=listing_id)
    for method, request in (("AddListing", add), ("RemoveListing", remove)):
        denied = _auth_cases(stack, lambda r, **kw: stack.gateway(method, r, **kw), request)
        assert denied["none"][0] == CODE.UNAUTHENTICATED and "Bearer" in denied["none"][1]
        assert denied["basic"][0] == CODE.UNAUTHENTICATED
        assert denied["wrong"][0] == CODE.PERMISSION_DENIED
        assert denied["wrong, same length"][0] == CODE.PERMISSION_DENIED
        assert all(stack.token not in details for _, details in denied.values())
        get = stack.gateway("GetListing", gateway_pb2.GetListingRequest(listing_id=listing_id))
        assert get[0] == CODE.NOT_FOUND  # a denied AddListing stored nothing
    code, details, _ = stack.gateway("AddListing", add, write=True)
    assert code == OK, details
    # reads need no token
    known = stack.bootstrapped[0].listing_id
    assert stack.gateway("GetListing", gateway_pb2.GetListingRequest(listing_id=listing_id))[0] == OK
    assert stack.gateway("SimilarListings", gateway_pb2.SimilarListingsRequest(listing_id=known))[0] == OK
    assert stack.gateway("SearchByImage", gateway_pb2.SearchByImageRequest(image=stack.photos[4]))[0] == OK
    assert stack.gateway("ClassifyImage", gateway_pb2.ClassifyImageRequest(image=stack.photos[4]))[0] == OK
    assert stack.gateway("RemoveListing", remove, write=True)[0] == OK
    assert (
        stack.gateway("GetListing", gateway_pb2.GetListingRequest(listing_id=listing_id))[0] == CODE.NOT_FOUND
    )


# ------------------------------------------------------------------------------ tracing


def _log_entries(stack, key: str, request_id: str) -> list[dict]:
    entries = []
    for line in stack.log_path(key).read_text(errors="replace").splitlines():
        if request_id not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("request_id") == request_id:
            entries.append(entry)
    return entries


def _wait_for_entries(stack, keys, request_id: str, timeout: float = 10.0) -> dict[str, list[dict]]:
    deadline = time.monotonic() + timeout
    while True:
        found = {key: _log_entries(stack, key, request_id) for key in keys}
        if all(found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_request_id_from_the_client_is_in_every_service_log(stack):
    """A request id a client sends to the gateway (x-request-id) is in the gateway's, the
    embedder's and every indexer shard's log lines for that request; a failed request can be
    followed to the service that rejected it."""
    good, bad = f"trace-ok-{secrets.token_hex(6)}", f"trace-bad-{secrets.token_hex(6)}"
    code, details, _ = stack.gateway(
        "SearchByImage",
        gateway_pb2.SearchByImageRequest(image=stack.photos[5], k=3),
        metadata=[("x-request-id", good)],
    )
    assert code == OK, details
    code, details, _ = stack.gateway(
        "SearchByImage",
        gateway_pb2.SearchByImageRequest(image=b"definitely not a photo", k=3),
        metadata=[("x-request-id", bad)],
    )
    assert code == CODE.INVALID_ARGUMENT

    found = _wait_for_entries(stack, stack.keys, good)
    assert all(found.values()), {key: len(entries) for key, entries in found.items()}
    methods = {key: {entry.get("method") for entry in entries} for key, entries in found.items()}
    assert f"/{GATEWAY}/SearchByImage" in methods["gateway"]
    assert f"/{EMBEDDER}/Embed" in methods["embedder"]
    for key in stack.indexer_keys:
        assert f"/{INDEXER}/Search" in methods[key]

    failed = _wait_for_entries(stack, ["gateway", "embedder"], bad)
    assert any(
        e.get("method") == f"/{GATEWAY}/SearchByImage" and e.get("code") == "INVALID_ARGUMENT"
        for e in failed["gateway"]
    )
    assert any(
        e.get("method") == f"/{EMBEDDER}/Embed" and e.get("code") == "INVALID_ARGUMENT"
        for e in failed["embedder"]
    ), failed["embedder"]
    assert all(not _log_entries(stack, key, bad) for key in stack.indexer_keys)  # never got there


def test_request_id_made_by_the_gateway_reaches_the_embedder(stack):
    """Without an x-request-id from the client the gateway makes one and still passes it on."""
    code, details, _ = stack.gateway("ClassifyImage", gateway_pb2.ClassifyImageRequest(image=stack.photos[6]))
    assert code == OK, details
    method = f"/{GATEWAY}/ClassifyImage"
    deadline = time.monotonic() + 10
    while True:
        lines = [
            json.loads(line)
            for line in stack.log_path("gateway").read_text().splitlines()
            if method in line and line.startswith("{")
        ]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    request_id = lines[-1]["request_id"]
    assert request_id not in ("", "-")
    found = _wait_for_entries(stack, ["embedder"], request_id)["embedder"]
    assert any(e.get("method") == f"/{EMBEDDER}/Classify" for e in found), found


# ------------------------------------------------------------------------------ load


def test_bounded_load_no_request_fails_memory_stays_bounded(stack, record_property):
    stats = run_load(stack, requests=160, concurrency=16, max_seconds=60)
    RESULTS["load"] = stats
    report(record_property, "load", describe_load(stats), sent=stats.sent, failed=stats.failed)
    assert stats.sent == 160
    assert stats.failed == 0, dict(stats.failures)
    assert stats.lost_writes == 0, stats.lost
    assert stats.acked_writes > 0
    for key, before in stats.rss_before.items():
        bound = max(256 * 2**20, before // 2)
        assert stats.rss_after[key] - before < bound, (
            f"{key} grew from {mib(before)} to {mib(stats.rss_after[key])} during the load"
        )
        assert stats.rss_peak[key] - before < 2 * bound


# ------------------------------------------------------------------------------ faults


def test_killed_services_unavailable_within_deadline_then_full_service_no_write_lost(stack, record_property):
    stats = run_faults(
        stack,
        services=["embedder", "indexer-0", "gateway"],
        concurrency=3,
        max_requests=1500,
        max_seconds=150,
        deadline_s=5.0,
        outage_s=0.5,
    )
    RESULTS["faults"] = stats
    report(
        record_property,
        "faults",
        describe_faults(stats),
        acked_writes=stats.acked_writes,
        lost_writes=stats.lost_writes,
    )
    assert [outage.service for outage in stats.outages] == ["embedder", "indexer-0", "gateway"]
    assert stats.problems == [], "\n".join(stats.problems)
    for outage in stats.outages:
        assert outage.probes and all(p.seconds < p.deadline_s for p in outage.probes)
    assert stats.failed == 0, dict(stats.unexpected)
    assert stats.acked_writes > 0 and stats.unavailable > 0 and stats.ok > 0
    assert stats.lost_writes == 0, stats.lost


def test_figures(record_property):
    """The headline figures over the parts above (runs last in this module)."""
    if not RESULTS:
        pytest.skip("no part of the suite ran")
    values = figures(RESULTS.get("fuzz"), RESULTS.get("load"), RESULTS.get("faults"))
    report(record_property, "reliability", result_line(values), **values)
    assert values["lost_writes"] == 0 and values["failed"] == 0
