"""SimilarListings quality: listing-to-listing same-category precision@10, photos only and photos
+ text fused, with the text weight chosen on the valid split (used by `benchmarks.search_quality`).

Two measurements that must agree:

* offline, from the artefact's exported vectors (``embeddings/image_embeddings.npy`` and
  ``text_embeddings.npy``), the gateway's ranking recomputed in NumPy: a listing's photo score is
  its best inner product with any photo of the query listing; fused, each modality's top
  ``max(3k, 50)`` listings are combined as ``(1 - w) * photo + w * text``, a listing missing from
  one list taking that list's lowest score. This is where ``w`` is chosen (valid listings).
* through the real services: embedder, indexer and gateway started as processes on free loopback
  ports, the catalogue loaded from the prepared data and indexed from the artefact, and
  ``SimilarListings`` called for each test listing with ``GATEWAY_SIMILAR_TEXT_WEIGHT`` set to the
  valid-chosen weight, and again with ``photos_only``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

K = 10
#: The text weights tried on the valid split.
WEIGHT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


class SimilarityData:
    """Photo and text vectors of the catalogue, indexed for the per-listing scores."""

    def __init__(self, listings: pd.DataFrame, image_ids: list[str], image_vectors: np.ndarray,
                 photo_listing: dict[str, str], text_ids: list[str], text_vectors: np.ndarray) -> None:
        keep = [i for i, image_id in enumerate(image_ids) if image_id in photo_listing]
        self.image_vectors = np.asarray(image_vectors[keep], dtype=np.float32)
        owners = [photo_listing[image_ids[i]] for i in keep]
        self.listing_ids = sorted(set(owners) | set(text_ids))
        self.row = {listing_id: i for i, listing_id in enumerate(self.listing_ids)}
        self.photo_owner = np.array([self.row[o] for o in owners], dtype=np.int64)
        self.photos_of: dict[int, np.ndarray] = {}
        for photo, owner in enumerate(self.photo_owner):
            self.photos_of.setdefault(int(owner), []).append(photo)
        self.photos_of = {o: np.asarray(p) for o, p in self.photos_of.items()}
        self.text = np.zeros((len(self.listing_ids), text_vectors.shape[1]), dtype=np.float32)
        self.has_text = np.zeros(len(self.listing_ids), dtype=bool)
        for listing_id, vector in zip(text_ids, text_vectors):
            self.text[self.row[listing_id]] = vector
            self.has_text[self.row[listing_id]] = True
        category = dict(zip(listings["product_id"], listings["main_category"]))
        self.category = np.array([category.get(i, "") for i in self.listing_ids])

    def scores(self, listing_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(photo score, text score) of every catalogue listing for one query listing; -inf where
        a listing has no photo / no text, and for the query listing itself."""
        q = self.row[listing_id]
        image = np.full(len(self.listing_ids), -np.inf, dtype=np.float32)
        if q in self.photos_of:
            per_photo = (self.image_vectors[self.photos_of[q]] @ self.image_vectors.T).max(axis=0)
            np.maximum.at(image, self.photo_owner, per_photo)
        text = np.where(self.has_text, self.text @ self.text[q], -np.inf).astype(np.float32)
        image[q] = text[q] = -np.inf
        return image, text


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    finite = np.flatnonzero(np.isfinite(scores))
    return finite[np.argsort(-scores[finite], kind="stable")[:n]]


def similar_ranking(image: np.ndarray, text: np.ndarray, k: int, text_weight: float | None) -> np.ndarray:
    """Rows of the top-k listings: by photos alone (``text_weight`` None, or no photo score),
    else fused as the gateway does."""
    if text_weight is None or not np.isfinite(image).any():
        return _top(image if text_weight is None else text, k)
    n = max(3 * k, 50)
    top_image, top_text = _top(image, n), _top(text, n)
    if len(top_text) == 0:
        return top_image[:k]
    candidates = np.union1d(top_image, top_text)
    image_part = np.full(len(candidates), image[top_image].min())
    text_part = np.full(len(candidates), text[top_text].min())
    in_image, in_text = np.isin(candidates, top_image), np.isin(candidates, top_text)
    image_part[in_image] = image[candidates[in_image]]
    text_part[in_text] = text[candidates[in_text]]
    fused = (1 - text_weight) * image_part + text_weight * text_part
    return candidates[np.argsort(-fused, kind="stable")[:k]]


def offline_precision(data: SimilarityData, query_ids: list[str], weights, k: int = K) -> dict:
    """{weight (None = photos only): same-category precision@k} over the query listings."""
    hits: dict = {w: [] for w in weights}
    for listing_id in query_ids:
        image, text = data.scores(listing_id)
        own = data.category[data.row[listing_id]]
        for w in weights:
            top = similar_ranking(image, text, k, w)
            hits[w].append(float(np.mean(data.category[top] == own)) if len(top) else 0.0)
    return {w: float(np.mean(v)) for w, v in hits.items()}


def choose_weight(data: SimilarityData, valid_ids: list[str]) -> tuple[float, dict]:
    """The text weight with the best valid precision@10 (ties: the smaller weight)."""
    curve = offline_precision(data, valid_ids, WEIGHT_GRID)
    best = max(WEIGHT_GRID, key=lambda w: (round(curve[w], 6), -w))
    return best, curve


def through_services(artifact: Path, prepared: Path, query_ids: list[str], text_weight: float,
                     k: int = K, log=print) -> dict:
    """Same-category precision@k of SimilarListings (fused and photos-only) from the real services."""
    from common.prepared_data import LISTINGS_FILE, read_rows
    from scripts import stack
    from services.gateway.client import GatewayClient

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="similar-bench-") as tmp:
        run_dir = Path(tmp)
        ports = {name: stack.free_port() for name in ("embedder", "indexer", "gateway")}
        env = {**stack.stack_env(run_dir, ports, artifact), "EMBEDDER_TEXT_MODEL": "on",
               "INDEXER_FSYNC": "false", "GATEWAY_SIMILAR_TEXT_WEIGHT": str(text_weight),
               "GATEWAY_DOWNSTREAM_TIMEOUT_S": "60", "LOG_LEVEL": "warning"}
        stack.bootstrap_catalogue(run_dir / "catalogue.sqlite3", prepared)
        procs: dict = {}
        try:
            for name in ("indexer", "embedder", "gateway"):
                procs[name] = stack.spawn(name, ports[name], run_dir / "logs" / f"{name}.log", env)
            for proc in procs.values():
                stack.wait_ready(proc, 600)
            stack.index_catalogue(run_dir / "catalogue.sqlite3", artifact, prepared, procs)
            log(f"  services up and catalogue indexed in {time.perf_counter() - started:.0f} s")
            categories = {row["product_id"]: row["main_category"]
                          for row in read_rows(prepared, LISTINGS_FILE, required=("product_id", "main_category"))}
            fused, photos = [], []
            with GatewayClient(procs["gateway"].address, timeout=120) as client:
                for n, listing_id in enumerate(query_ids, 1):
                    own = categories[listing_id]
                    for results, sink in ((client.similar(listing_id, k=k), fused),
                                          (client.similar(listing_id, k=k, photos_only=True), photos)):
                        sink.append(float(np.mean([r.listing.main_category == own for r in results]))
                                    if results else 0.0)
                    if n % 50 == 0:
                        log(f"  SimilarListings: {n}/{len(query_ids)} listings")
        finally:
            for proc in reversed(list(procs.values())):
                proc.stop()
    return {"fused": float(np.mean(fused)), "photos_only": float(np.mean(photos)),
            "queries": len(query_ids), "seconds": time.perf_counter() - started}
