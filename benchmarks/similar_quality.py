"""SimilarListings quality: listing-to-listing same-category precision@10, photos only and photos
+ text fused, with the text weight chosen on the valid split (used by `benchmarks.search_quality`).

Two measurements that must agree:

* offline, from the artefact's exported vectors (``embeddings/image_embeddings.npy`` and
  ``text_embeddings.npy``), the gateway's ranking recomputed in NumPy: a listing's photo score is
  its best inner product with any photo of the query listing; fused, each modality's top
  ``max(3k, 50)`` listings are combined as ``(1 - w) * photo + w * text``, a listing missing from
  one list taking that list's lowest score. This is where ``w`` is chosen (valid listings;
  `training.fusion_weights`, which writes the choice into the artefact).
* through the real services: embedder, indexer and gateway started as processes on free loopback
  ports, the catalogue loaded from the prepared data and indexed from the artefact, and
  ``SimilarListings`` called for each test listing, the gateway taking the weight from the
  embedder's artefact (``fusion_weights.json``; or ``GATEWAY_SIMILAR_TEXT_WEIGHT`` set to a weight
  chosen here when the artefact has none), and again with ``photos_only``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

# The offline ranking and the weight choice live with the training step that writes the weights.
from training.fusion_weights import (  # noqa: F401  (re-exported for benchmarks.search_quality)
    K,
    WEIGHT_GRID,
    SimilarityData,
    choose_weight,
    offline_precision,
    search_precision,
    similar_ranking,
)


def through_services(
    artifact: Path, prepared: Path, query_ids: list[str], text_weight: float | None, k: int = K, log=print
) -> dict:
    """Same-category precision@k of SimilarListings (fused and photos-only) from the real services.
    ``text_weight`` None: the gateway takes it from the embedder's artefact (fusion_weights.json),
    as it does when GATEWAY_SIMILAR_TEXT_WEIGHT is unset."""
    from common.prepared_data import LISTINGS_FILE, read_rows
    from scripts import stack
    from services.gateway.client import GatewayClient

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="similar-bench-") as tmp:
        run_dir = Path(tmp)
        ports = {name: stack.free_port() for name in ("embedder", "indexer", "gateway")}
        env = {
            **stack.stack_env(run_dir, ports, artifact),
            "EMBEDDER_TEXT_MODEL": "on",
            "INDEXER_FSYNC": "false",
            "GATEWAY_DOWNSTREAM_TIMEOUT_S": "60",
            "LOG_LEVEL": "warning",
        }
        # empty = unset, also over a value in this process's environment
        env["GATEWAY_SIMILAR_TEXT_WEIGHT"] = "" if text_weight is None else str(text_weight)
        stack.bootstrap_catalogue(run_dir / "catalogue.sqlite3", prepared)
        procs: dict = {}
        try:
            for name in ("indexer", "embedder", "gateway"):
                procs[name] = stack.spawn(name, ports[name], run_dir / "logs" / f"{name}.log", env)
            for proc in procs.values():
                stack.wait_ready(proc, 600)
            stack.index_catalogue(run_dir / "catalogue.sqlite3", artifact, prepared, procs)
            log(f"  services up and catalogue indexed in {time.perf_counter() - started:.0f} s")
            categories = {
                row["product_id"]: row["main_category"]
                for row in read_rows(prepared, LISTINGS_FILE, required=("product_id", "main_category"))
            }
            fused, photos = [], []
            with GatewayClient(procs["gateway"].address, timeout=120) as client:
                for n, listing_id in enumerate(query_ids, 1):
                    own = categories[listing_id]
                    for results, sink in (
                        (client.similar(listing_id, k=k), fused),
                        (client.similar(listing_id, k=k, photos_only=True), photos),
                    ):
                        sink.append(
                            float(np.mean([r.listing.main_category == own for r in results]))
                            if results
                            else 0.0
                        )
                    if n % 50 == 0:
                        log(f"  SimilarListings: {n}/{len(query_ids)} listings")
        finally:
            for proc in reversed(list(procs.values())):
                proc.stop()
    return {
        "fused": float(np.mean(fused)),
        "photos_only": float(np.mean(photos)),
        "queries": len(query_ids),
        "seconds": time.perf_counter() - started,
    }
