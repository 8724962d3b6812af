"""Near-duplicate photos and listing texts: what must share a split besides byte-identical photos."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from common.listing_text import listing_text
from training.prepare.splits import UnionFind, name_groups

#: Two photos are near-duplicates when their 63-bit perceptual hashes differ in at most this many
#: bits *and* their thumbnails correlate at least `NEAR_DUPLICATE_CORRELATION`.  Measured on the
#: shared data against the manifest's source-photo ids (git blob SHA-1 of the 512 px original, so
#: a photo kept at 512 px and again re-encoded at 320 px shares one): all 251 pairs of the same
#: source photo are within 8 bits (they correlate >= 0.976), but so are 290 pairs of different
#: sources, mostly unrelated photos whose black letterbox bands dominate the hash; the correlation
#: and grey-level checks keep the 137 of those that are really the same shot re-uploaded or a
#: burst of it, and drop the rest, which would otherwise chain unrelated listings together.
NEAR_DUPLICATE_HAMMING = 8
NEAR_DUPLICATE_CORRELATION = 0.95
#: ... and their grey levels differ by at most this much on average (0-255 scale).  Correlation
#: ignores brightness and contrast, so without this two plain shapes of the same outline but
#: different colour would count as one photo; same-source pairs differ by at most 6.5 here.
NEAR_DUPLICATE_MEAN_DIFFERENCE = 16.0
#: Listings whose texts (TF-IDF of words and word pairs) have at least this cosine are re-posts
#: of one another and are kept in one split.  At 0.90 one shop's boilerplate signature links 29
#: different appliances; at 0.95 the largest such group is 8 copies of the same advert.
NEAR_DUPLICATE_TEXT_COSINE = 0.95
_PAIR_CHUNK = 1024  # rows of the all-pairs comparisons computed at once


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix (rows are frequencies)."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def perceptual_hashes(thumbs: np.ndarray) -> np.ndarray:
    """pHash of grey thumbnails (n, side, side) -> (n, 63) bool: the signs of the 8x8 lowest DCT
    frequencies (the constant one left out) against their median."""
    side = thumbs.shape[1]
    dct = _dct_matrix(side)
    low = (dct[:8] @ thumbs.astype(np.float64) @ dct[:8].T).reshape(len(thumbs), 64)[:, 1:]
    return low > np.median(low, axis=1, keepdims=True)


def _as_uint64(bits: np.ndarray) -> np.ndarray:
    """(n, <=64) bool -> (n,) uint64, one bit per column."""
    padded = np.zeros((len(bits), 64), dtype=bool)
    padded[:, : bits.shape[1]] = bits
    return np.packbits(padded, axis=1).view(">u8").ravel().astype(np.uint64)


def near_duplicate_photo_pairs(
    thumbs: np.ndarray,
    *,
    max_hamming: int = NEAR_DUPLICATE_HAMMING,
    min_correlation: float = NEAR_DUPLICATE_CORRELATION,
    max_mean_difference: float = NEAR_DUPLICATE_MEAN_DIFFERENCE,
) -> np.ndarray:
    """Index pairs (i < j) of near-duplicate photos among grey thumbnails (n, side, side).

    Robust to re-encoding and resizing: candidates are pairs whose perceptual hashes differ in at
    most `max_hamming` bits (counted for all pairs, `_PAIR_CHUNK` rows at a time, as the popcount
    of XORed 64-bit words), confirmed by the Pearson correlation of their thumbnails and their
    mean absolute grey-level difference.
    """
    n = len(thumbs)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    hashes = _as_uint64(perceptual_hashes(thumbs))
    grey = thumbs.reshape(n, -1).astype(np.float64)
    flat = grey - grey.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1)
    flat /= np.where(norms > 0, norms, 1.0)[:, None]  # a flat grey photo correlates 0 with all
    found = []
    for start in range(0, n, _PAIR_CHUNK):
        hamming = np.bitwise_count(hashes[start : start + _PAIR_CHUNK, None] ^ hashes[None, :])
        rows, cols = np.nonzero(hamming <= max_hamming)
        rows = rows + start
        keep = rows < cols
        rows, cols = rows[keep], cols[keep]
        correlation = np.einsum("ij,ij->i", flat[rows], flat[cols])
        difference = np.abs(grey[rows] - grey[cols]).mean(axis=1)
        confirmed = (correlation >= min_correlation) & (difference <= max_mean_difference)
        found.append(np.stack([rows[confirmed], cols[confirmed]], axis=1))
    return np.concatenate(found).astype(np.int64)


def near_duplicate_text_pairs(
    texts: Sequence[str], *, min_cosine: float = NEAR_DUPLICATE_TEXT_COSINE
) -> np.ndarray:
    """Index pairs (i < j, sorted) of texts whose TF-IDF (words and word pairs) cosine is >= `min_cosine`."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    if len(nonempty) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    vectors = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(
        [texts[i] for i in nonempty]
    )
    index = np.asarray(nonempty)
    found = []
    for start in range(0, len(nonempty), _PAIR_CHUNK):
        similar = (vectors[start : start + _PAIR_CHUNK] @ vectors.T).tocoo()
        rows = similar.row + start
        keep = (rows < similar.col) & (similar.data >= min_cosine - 1e-9)
        found.append(np.stack([index[rows[keep]], index[similar.col[keep]]], axis=1))
    pairs = np.concatenate(found).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def near_duplicate_text_links(
    listings: pd.DataFrame, *, min_cosine: float = NEAR_DUPLICATE_TEXT_COSINE
) -> list[tuple[str, str]]:
    """Pairs of product ids whose listing texts (`common.text.listing_text`) are near-identical."""
    texts = [listing_text(t, d) for t, d in zip(listings["title"], listings["description"])]
    ids = listings["product_id"].tolist()
    return [(ids[i], ids[j]) for i, j in near_duplicate_text_pairs(texts, min_cosine=min_cosine)]


def photo_groups(images: pd.DataFrame, pairs: np.ndarray) -> pd.Series:
    """Give every photo the id of its near-duplicate group: photos with the same sha256 or joined
    by `pairs` (row positions in `images`), named by the smallest image_id in the group."""
    uf = UnionFind()
    image_ids = images["image_id"].tolist()
    for image_id in image_ids:
        uf.find(image_id)
    for _, ids in images.groupby("sha256")["image_id"]:
        first, *rest = ids.tolist()
        for other in rest:
            uf.union(first, other)
    for i, j in pairs:
        uf.union(image_ids[i], image_ids[j])
    return name_groups(image_ids, uf, images.index)
