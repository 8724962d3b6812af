"""Helpers for the indexer tests: random data and brute-force ground truth."""

from __future__ import annotations

import numpy as np

from services.indexer.attributes import Attributes


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(
    db: np.ndarray, queries: np.ndarray, k: int, metric: str = "ip", allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of db indices and scores (higher is better) of the k best, optionally among
    ``allowed`` rows only - the ground truth every search is compared with."""
    if metric == "ip":
        scores = queries.astype(np.float64) @ db.astype(np.float64).T
    else:
        diff = queries[:, None, :].astype(np.float64) - db[None, :, :].astype(np.float64)
        scores = -(diff**2).sum(axis=2)
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def catalogue_attributes(n: int, images_per_listing: int = 3) -> list[Attributes]:
    """Attributes for n images: listings of several images, 4 categories, prices 0..n-1,
    every 10th price unknown."""
    categories = ["Home & Garden", "Sports", "Music", "Clothes"]
    return [
        Attributes(
            listing_id=f"L{i // images_per_listing}",
            category=categories[i % 4],
            price=None if i % 10 == 9 else float(i),
            location=f"Town {i % 7}",
        )
        for i in range(n)
    ]


def ids_for(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]
