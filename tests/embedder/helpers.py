"""Settings of the embedder test server and small helpers shared by the embedder tests."""

from __future__ import annotations

import numpy as np

from common.serving import MiB

# Small limits so the limit tests need only small payloads.
MAX_BATCH = 8
MAX_IMAGE_BYTES = 2 * MiB
MAX_PIXELS = 4_000_000


def vectors(response) -> np.ndarray:
    """The embeddings of an EmbedResponse as a (N, D) float32 array."""
    return np.array([list(v.values) for v in response.embeddings], dtype=np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
