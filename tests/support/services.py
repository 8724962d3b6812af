"""The real gRPC services in-process on ephemeral loopback ports, for tests that need a whole stack:
indexer shards, and the text stack (an embedder serving the image model and all-MiniLM-L6-v2, two
shards with an "image" and a "text" collection, the gateway over them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.embedder.config import EmbedderConfig
from services.gateway.config import GatewayConfig, RetryPolicy
from services.gateway.server import start as start_gateway
from services.indexer.config import IndexerConfig
from services.indexer.server import start as start_indexer
from services.indexer.spec import parse_collections
from tests.support.text import start_text_embedder

#: An image collection of the test model's 1280-d vectors and a text one of MiniLM's 384-d.
TEXT_STACK_COLLECTIONS = "image:1280:flat:ip,text:384:flat:ip"


def start_shards(root: Path, collections: str, count: int = 2, **settings) -> list:
    """``count`` indexer servers serving ``collections``, data in ``root/indexer-<n>`` (no fsync:
    tests do not survive power cuts), with further `IndexerConfig.local` ``settings``; the caller
    stops them."""
    return [
        start_indexer(
            IndexerConfig.local(
                host="127.0.0.1",
                port=0,
                data_dir=root / f"indexer-{n}",
                log_level="warning",
                collections=tuple(parse_collections(collections)),
                collections_explicit=True,
                fsync=False,
                **settings,
            )
        )
        for n in range(count)
    ]


@dataclass
class TextStack:
    embedder: object
    shards: list
    gateway: object
    config: GatewayConfig


@contextmanager
def text_stack(root: Path, artifact_dir: Path, prepared: Path, **gateway_settings) -> Iterator[TextStack]:
    """The embedder (serving text too), two shards of `TEXT_STACK_COLLECTIONS` and a gateway whose
    catalogue is seeded from ``prepared``; ``gateway_settings`` are further `GatewayConfig.local`
    settings. Nothing is indexed yet. Everything is stopped on leaving."""
    with ExitStack() as stop:
        embedder = start_text_embedder(
            EmbedderConfig.local(artifact_dir=artifact_dir, host="127.0.0.1", port=0, text_model="on")
        )
        stop.callback(embedder.stop, 0)
        shards = start_shards(root, TEXT_STACK_COLLECTIONS)
        for shard in shards:
            stop.callback(shard.stop, 0)
        config = GatewayConfig.local(
            host="127.0.0.1",
            port=0,
            db_path=root / "catalogue.sqlite3",
            bootstrap_dir=prepared,
            embedder_addr=f"127.0.0.1:{embedder.port}",
            indexer_addrs=tuple(f"127.0.0.1:{s.port}" for s in shards),
            retry=RetryPolicy(3, 0.05, 0.2),
            **gateway_settings,
        )
        gateway = start_gateway(config)
        stop.callback(gateway.stop, 0)
        yield TextStack(embedder, shards, gateway, config)
