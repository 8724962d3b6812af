"""The gateway: the public API in listing terms, composing the embedder and the indexer shards.

config.py          GATEWAY_SETTINGS (each setting declared once, `common.config`) -> GatewayConfig
domain.py          Listing, SearchFilter, RankedListing, ... and GatewayError (`common.errors`)
catalogue.py       the listing catalogue: listings, stored vectors, outbox (migrations, bulk load)
catalogue_db.py    GATEWAY_DB as a URL; the SQLite and PostgreSQL back ends
outbox.py          pushes queued vector writes to the owning shard (docs/catalogue.md)
ranking.py         merge hits by listing; image/text fusion (common.ranking)
shards.py          listing id -> indexer shard (stable hash, or the versioned shard map)
shard_map_store.py the shard map's versions in the catalogue database (compare-and-set)
downstream.py      embedder / indexer-shard clients: deadlines, retries, fan-out, error mapping
core.py            the orchestration behind each RPC (image/text/hybrid search, similar,
                   recommend, add/remove all-or-nothing)
convert.py         public protos <-> domain objects
readiness.py       health entry "marketplace.gateway.v1.Gateway" follows the downstreams'
server.py          the thin gRPC servicer, start(config) and main()
client.py, cli.py  Python client and command line
load_catalogue.py  python -m services.gateway.load_catalogue --prepared build/data --db PATH
index_catalogue.py python -m services.gateway.index_catalogue (photo and text vectors -> shards)
reconcile.py       python -m services.gateway.reconcile [--repair] (catalogue vs shards)
rebalance.py       python -m services.gateway.rebalance --to N (move partitions to new shards)
"""
