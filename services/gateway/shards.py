"""Which indexer shard holds a listing's vectors.

A listing's vectors (all its photos, and its text vector) live on one shard, chosen by a
stable hash of the listing id modulo the number of shards. Writes, deletes and fetches for a
listing go to that shard only; searches go to every shard and are merged by score
(`ranking.merge_by_listing`).

The hash is BLAKE2b, not Python's ``hash()`` (salted per process), so every gateway replica and
every run agree. Changing the number of shards moves most listings: re-index
(`python -m services.gateway.index_catalogue`) into fresh shards after changing ``INDEXER_ADDRS``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable


def shard_of(listing_id: str, num_shards: int) -> int:
    """The shard number (0-based, the position in INDEXER_ADDRS) that owns ``listing_id``."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards == 1:
        return 0
    digest = hashlib.blake2b(listing_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def group_by_shard(listing_ids: Iterable[str], num_shards: int) -> dict[int, list[str]]:
    """Listing ids grouped by owning shard (only shards that own at least one), order kept."""
    groups: dict[int, list[str]] = {}
    for listing_id in listing_ids:
        groups.setdefault(shard_of(listing_id, num_shards), []).append(listing_id)
    return groups
