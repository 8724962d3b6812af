"""Reconcile the listing catalogue with the indexer shards: report, and with ``--repair`` fix,
vectors without a listing (orphans) and listings without their vectors (missing).

    python -m services.gateway.reconcile [--db GATEWAY_DB] [--indexers INDEXER_ADDRS] [--repair]

Last line: ``RECONCILE orphans=N missing=N pending=N unrepairable=N repaired=N``; the exit status
is 0 when nothing is left to repair, 1 otherwise.

How it reads without stopping the gateways: the catalogue is read, then every shard's ids
(the indexer's paged ListIds), then the catalogue again. A vector is an orphan when, in the second
read, its listing does not exist, lives on another shard, or does not own that photo; a catalogue
item is missing when its listing was live in both reads and the shard lacks it. Listings with
outbox entries still queued are skipped (the outbox is about to change their vectors) and counted
as ``pending``. Since a listing's vectors only reach a shard after its row is committed, and its
row only goes away in the transaction that queues the deletion, neither a concurrent AddListing
nor a concurrent RemoveListing is reported.

Run it outside a rebalance (vectors being copied to a new owner would count as orphans there).
Repairs go through the outbox, so they are ordered with any write of the same listing: an
orphan's deletion is queued as a delete entry; a missing listing's stored vectors (the catalogue
keeps every vector AddListing wrote) are queued for upsert. Listings loaded in bulk and indexed
by ``index_catalogue`` have no stored vectors: they are reported as ``unrepairable`` here; re-run
``python -m services.gateway.index_catalogue`` for them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.config import Settings
from common.security import TLS_CLIENT_SETTINGS, WRITE_TOKEN_SETTINGS, TlsFiles
from services.gateway.catalogue import Catalogue
from services.gateway.config import DB_FIELDS, GATEWAY_SETTINGS, RetryPolicy
from services.gateway.domain import FailedPrecondition
from services.gateway.downstream import IMAGE_COLLECTION, TEXT_COLLECTION, Deadline, IndexerShards
from services.gateway.outbox import OutboxApplier
from services.gateway.tools import ToolSetupError, open_catalogue_and_shards

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    orphans: int = 0
    missing: int = 0
    pending: int = 0  # listings skipped because their outbox entries are still queued
    unrepairable: int = 0  # missing vectors the catalogue does not keep
    repaired: int = 0  # orphans deleted + missing vectors pushed again
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.orphans == 0 and self.missing == 0

    def line(self) -> str:
        return (
            f"RECONCILE orphans={self.orphans} missing={self.missing} pending={self.pending} "
            f"unrepairable={self.unrepairable} repaired={self.repaired}"
        )


def _index_ids(indexer: IndexerShards, deadline: Deadline) -> dict[tuple[str, int], dict[str, str]]:
    """{(collection, shard): {item id: listing id}}; a shard without a text collection is skipped."""
    held: dict[tuple[str, int], dict[str, str]] = {}
    for shard in range(len(indexer)):
        for collection in (IMAGE_COLLECTION, TEXT_COLLECTION):
            try:
                listed = indexer.list_ids(shard, deadline, collection=collection)
            except FailedPrecondition:
                if collection == IMAGE_COLLECTION:
                    raise
                continue
            held[(collection, shard)] = {item: listing or item for item, listing in listed}
    return held


def reconcile(
    catalogue: Catalogue,
    indexer: IndexerShards,
    *,
    repair: bool = False,
    timeout_s: float = 120.0,
    applier: OutboxApplier | None = None,
) -> ReconcileReport:
    deadline = Deadline(timeout_s)
    images_before, texts_before, states_before = catalogue.index_expectation()
    held = _index_ids(indexer, deadline)
    images, _, states = catalogue.index_expectation()
    pending = catalogue.pending_listing_ids()
    report = ReconcileReport(pending=len(pending))

    orphans: dict[tuple[str, int], dict[str, list[str]]] = {}
    for (collection, shard), items in held.items():
        for item_id, listing_id in items.items():
            if listing_id in pending:
                continue
            owned = (
                listing_id in states
                and indexer.shard_for(listing_id) == shard
                and (collection != IMAGE_COLLECTION or item_id in images[listing_id])
            )
            if not owned:
                orphans.setdefault((listing_id, shard), {}).setdefault(collection, []).append(item_id)
                report.orphans += 1
                if len(report.examples) < 10:
                    report.examples.append(
                        f"orphan {collection} vector {item_id} of listing {listing_id} on shard {shard}"
                    )

    missing: dict[str, int] = {}
    for listing_id, state in states_before.items():
        if state != "live" or states.get(listing_id) != "live" or listing_id in pending:
            continue
        shard = indexer.shard_for(listing_id)
        photos = held.get((IMAGE_COLLECTION, shard), {})
        absent = [i for i in images_before[listing_id] if i not in photos]
        texts = held.get((TEXT_COLLECTION, shard))
        if listing_id in texts_before and texts is not None and listing_id not in texts:
            absent.append(listing_id)
        if absent:
            missing[listing_id] = shard
            report.missing += len(absent)
            if len(report.examples) < 10:
                report.examples.append(f"listing {listing_id} lacks {len(absent)} vector(s) on shard {shard}")

    if repair and (orphans or missing):
        for (listing_id, shard), item_ids in orphans.items():
            catalogue.queue_delete(listing_id, shard, item_ids)
            report.repaired += sum(len(ids) for ids in item_ids.values())
        for listing_id, shard in missing.items():
            if catalogue.queue_upsert(listing_id, shard) is None:
                report.unrepairable += 1
            else:
                report.repaired += 1
        applier = applier or OutboxApplier(catalogue, indexer)
        applier.drain(max(1.0, deadline.remaining()))
    elif missing:
        report.unrepairable = len(set(missing) - catalogue.stored_vector_listings())
    return report


#: What the command reads, declared with the gateway's settings (same variables, same flags).
RECONCILE_SETTINGS = Settings(
    *(
        GATEWAY_SETTINGS[name]
        for name in (*DB_FIELDS, "indexer_addrs", "indexer_shards", "shard_map", "partitions")
    ),
    *WRITE_TOKEN_SETTINGS,
    *TLS_CLIENT_SETTINGS,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway.reconcile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repair", action="store_true", help="fix what is found (through the outbox)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole run")
    args = RECONCILE_SETTINGS.add_flags(parser).parse_args(argv)
    settings = RECONCILE_SETTINGS.read(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        catalogue, indexer = open_catalogue_and_shards(
            settings, RetryPolicy(), TlsFiles.from_values(settings)
        )
    except ToolSetupError as exc:
        print(f"reconcile: {exc}", file=sys.stderr)
        return 2
    try:
        report = reconcile(catalogue, indexer, repair=args.repair, timeout_s=args.timeout)
        if args.repair and report.repaired:
            after = reconcile(catalogue, indexer, timeout_s=args.timeout)
            print(
                f"repaired {report.repaired}; after repair: orphans={after.orphans} missing={after.missing}"
            )
            report.orphans, report.missing = after.orphans, after.missing
    finally:
        indexer.close()
        catalogue.close()
    for example in report.examples:
        print(example)
    print(report.line())
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
