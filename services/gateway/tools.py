"""What the gateway's command-line tools that write to the index (`index_catalogue`, `reconcile`)
share: the catalogue database and the indexer shards, opened as the gateway opens them."""

from __future__ import annotations

from common.security import TlsFiles, resolve_write_token
from common.shard_map import ShardMapError
from services.gateway.catalogue import Catalogue, CatalogueError, CatalogueUnavailable
from services.gateway.config import RetryPolicy, database_password, shard_lists
from services.gateway.downstream import IndexerShards
from services.gateway.shards import routing_for


class ToolSetupError(Exception):
    """A setting the tool cannot work with; the message names it (``GATEWAY_DB: ...``,
    ``shard map: ...``)."""


def open_catalogue_and_shards(
    settings: dict, policy: RetryPolicy, tls: TlsFiles
) -> tuple[Catalogue, IndexerShards]:
    """The catalogue of ``settings["db_path"]`` and the shards of ``settings`` routed by its shard
    map (version 1 created when ``settings["shard_map"]`` says so), writing with the write
    token. ToolSetupError when either cannot be used; nothing is left open then."""
    try:
        catalogue = Catalogue.open(settings["db_path"], password=database_password(settings))
    except (CatalogueError, CatalogueUnavailable) as exc:
        raise ToolSetupError(f"GATEWAY_DB: {exc}") from None
    replicas = shard_lists(settings)
    try:
        routing = routing_for(
            len(replicas), catalogue.shard_map_store(), settings["partitions"], create=settings["shard_map"]
        )
    except ShardMapError as exc:
        catalogue.close()
        raise ToolSetupError(f"shard map: {exc}") from None
    shards = IndexerShards(
        replicas,
        policy,
        routing=routing,
        tls=tls,
        write_token=resolve_write_token(settings["write_token"], settings["write_token_file"]),
    )
    return catalogue, shards
