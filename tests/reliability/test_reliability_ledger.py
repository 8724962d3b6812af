"""The fault run's check for lost writes (`suite.verify_writes`) runs while the background load
keeps adding and removing listings: a listing the load removes during the check is not a lost
write, and a listing that really is gone still is."""

from __future__ import annotations

import random

from marketplace.gateway.v1 import gateway_pb2
from marketplace.indexer.v1 import indexer_pb2
from tests.reliability.suite import CODE, Ledger, Write, verify_writes


class Catalogue:
    """Stands in for the stack's gateway and one indexer shard: GetListing and Fetch over what it
    holds; ``remove_while_read`` removes a listing (as the load does) when its GetListing arrives."""

    text_served = False

    def __init__(self, ledger: Ledger, writes: list[Write]) -> None:
        self.ledger = ledger
        self.listings = {w.listing_id: w for w in writes}
        self.remove_while_read: set[str] = set()

    def gateway(self, method: str, request, timeout: float):
        assert method == "GetListing"
        listing_id = request.listing_id
        if listing_id in self.remove_while_read:
            self.remove_while_read.discard(listing_id)
            write = self.ledger.take_for_removal(random.Random(0), keep=set(self.listings) - {listing_id})
            del self.listings[listing_id]
            self.ledger.removal_done(write, acknowledged=True)
        if listing_id not in self.listings:
            return CODE.NOT_FOUND, f"listing {listing_id} not found", b""
        write = self.listings[listing_id]
        reply = gateway_pb2.Listing(id=listing_id, image_ids=list(write.image_ids))
        return CODE.OK, "", reply.SerializeToString()

    def indexer(self, shard: int, method: str, request, timeout: float):
        assert method == "Fetch"
        held = {i for w in self.listings.values() for i in w.image_ids}
        reply = indexer_pb2.FetchResponse(not_found=[i for i in request.ids if i not in held])
        return CODE.OK, "", reply.SerializeToString()


def test_a_listing_removed_during_the_check_is_not_lost_but_a_vanished_one_is():
    ledger = Ledger()
    writes = [Write(f"L{i}", (f"L{i}-a", f"L{i}-b"), 0) for i in range(4)]
    for write in writes:
        ledger.acknowledge(write)
    stack = Catalogue(ledger, writes)
    stack.remove_while_read = {"L1"}
    assert verify_writes(stack, ledger) == []
    assert "L1" in ledger.removed

    del stack.listings["L2"]  # acknowledged, never removed, gone: lost
    lost = verify_writes(stack, ledger, settle_s=0.0)
    assert lost == ["L2: GetListing NOT_FOUND: listing L2 not found"]
