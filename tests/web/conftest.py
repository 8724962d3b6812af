"""One real stack for the edge's tests: the embedder serving the small real image model
(`test_artifact`) and all-MiniLM-L6-v2, two indexer shards with "image" and "text" collections,
the gateway (write token set, image store on), all real gRPC servers in-process on ephemeral
ports; and the edge itself as a real process (``python -m services.web``) on a free port. The
catalogue is 39 real listings (3 per main category) with their real photos, indexed by photo and
by text; the image store holds the prepared photos.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from common.image_store import LocalImageStore, fill_from_prepared
from scripts.stack import free_port, spawn, wait_healthy
from services.gateway import index_catalogue
from tests.gateway.gateway_data import make_mini_prepared
from tests.support.services import text_stack

WRITE_TOKEN = "web-test-token"
#: The test edge's upload limit (WEB_MAX_UPLOAD_MB), small so a too-big upload is cheap to send.
UPLOAD_LIMIT_MB = 4


def start_edge(root: Path, gateway_addr: str, store: Path, name: str = "web"):
    """``python -m services.web`` on a free port, waited for; the caller stops it."""
    edge = spawn(
        "web",
        free_port(),
        root / f"{name}.log",
        {
            "GATEWAY_ADDR": gateway_addr,
            "IMAGE_STORE_DIR": str(store),
            "LOG_LEVEL": "warning",
            "WEB_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB),
            "WEB_GATEWAY_TIMEOUT_S": "60",
        },
    )
    try:
        wait_healthy(edge.address, 120, edge.process, edge.log_path, http=True)
    except BaseException:
        edge.stop()
        raise
    return edge


@pytest.fixture(scope="session")
def web_stack(tmp_path_factory, test_artifact):
    root = tmp_path_factory.mktemp("web_stack")
    prepared = make_mini_prepared(root / "prepared", per_category=3)
    store = root / "images"
    with text_stack(
        root,
        test_artifact,
        prepared,
        downstream_timeout_s=60.0,
        write_token=WRITE_TOKEN,
        image_store_dir=store,
    ) as services:
        core = services.gateway.core
        image_ids, vectors = index_catalogue.embed_prepared(
            prepared, core.catalogue, core.embedder, progress=False
        )
        index_catalogue.index_embeddings(core.catalogue, core.indexer, image_ids, vectors, progress=False)
        text_ids, text_vectors = index_catalogue.embed_catalogue_texts(
            core.catalogue, core.embedder, batch_size=32, progress=False
        )
        index_catalogue.index_text_embeddings(
            core.catalogue, core.indexer, text_ids, text_vectors, progress=False
        )
        filled = fill_from_prepared(LocalImageStore(store), prepared)
        assert filled.added == len(image_ids) and filled.skipped == 0
        edge = start_edge(root, f"127.0.0.1:{services.gateway.port}", store)
        try:
            yield SimpleNamespace(
                root=root,
                prepared=prepared,
                store=store,
                gateway=services.gateway,
                edge=edge,
                url=f"http://{edge.address}",
                gateway_config=services.config,
                listings=pd.read_csv(prepared / "listings.csv", dtype={"price": float}),
                images=pd.read_csv(prepared / "images.csv", dtype=str),
            )
        finally:
            edge.stop()


def photo_of(stack, listing_id: str) -> tuple[str, bytes]:
    """A listing's first photo: (image id, bytes)."""
    rows = stack.images[stack.images["product_id"] == listing_id].sort_values("image_id")
    return rows.iloc[0]["image_id"], Path(rows.iloc[0]["path"]).read_bytes()
