"""Honest evaluation on the prepared splits: classification per photo and per listing, retrieval
quality of the embeddings, and the pictures (confusion matrix, training curves).

Definitions (also written into the metrics JSON under ``definitions``):

* image top-k: a test photo counts as right when its listing's main category is among the k most
  probable categories of that photo alone;
* listing top-k: the photos of a test listing vote by averaging their class probabilities;
* precision@10: for every test photo the 10 nearest train photos by cosine similarity of the
  embeddings (the catalogue index the service would hold), fraction of the same main category;
* same-listing recall@k: every photo of a test listing with two or more photos is a query against
  the whole catalogue (all splits, 3,453 photos) without itself; a hit when another photo of the
  same listing is among the k nearest. Also reported against the test photos only (``test_gallery``),
  an easier reading of "query with one, find the other" (fewer distractors).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFINITIONS = {
    "image_top_k": "per test photo, true category among the k most probable of that photo alone",
    "listing_top_k": "per test listing, its photos' class probabilities averaged",
    "precision_at_10": "per test photo, fraction of its 10 nearest train photos (cosine) in the same main category",
    "same_listing_recall_at_k": "per photo of a test listing with >= 2 photos, queried against the whole "
    "catalogue without itself: another photo of its listing among the k nearest "
    "(test_gallery: against the test photos only)",
}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    if len(labels) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def listing_votes(
    probs: np.ndarray, labels: np.ndarray, listing_ids: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Average the class probabilities of each listing's photos: (probs, labels, listing ids)."""
    ids = np.asarray(listing_ids)
    unique, inverse = np.unique(ids, return_inverse=True)
    summed = np.zeros((len(unique), probs.shape[1]))
    np.add.at(summed, inverse, probs)
    counts = np.bincount(inverse, minlength=len(unique))[:, None]
    listing_labels = np.zeros(len(unique), dtype=int)
    listing_labels[inverse] = labels
    return summed / counts, listing_labels, unique.tolist()


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def per_class(matrix: np.ndarray, categories: Sequence[str]) -> dict:
    out = {}
    for i, name in enumerate(categories):
        tp = int(matrix[i, i])
        predicted = int(matrix[:, i].sum())
        actual = int(matrix[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": actual,
        }
    return out


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, listing_ids: Sequence[str], categories: Sequence[str]
) -> dict:
    """Image- and listing-level accuracy, per-class precision/recall, confusion matrix (rows: true)."""
    labels = np.asarray(labels, dtype=int)
    listing_probs, listing_labels, _ = listing_votes(probs, labels, listing_ids)
    matrix = confusion_matrix(labels, probs.argmax(axis=1), len(categories))
    return {
        "images": int(len(labels)),
        "listings": int(len(listing_labels)),
        "image_top1": top_k_accuracy(probs, labels, 1),
        "image_top3": top_k_accuracy(probs, labels, 3),
        "listing_top1": top_k_accuracy(listing_probs, listing_labels, 1),
        "listing_top3": top_k_accuracy(listing_probs, listing_labels, 3),
        "per_class": per_class(matrix, categories),
        "confusion_matrix": matrix.tolist(),
    }


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def precision_at_k(
    embeddings: np.ndarray, labels: np.ndarray, query: np.ndarray, index: np.ndarray, k: int = 10
) -> float:
    """Mean fraction of the k nearest `index` photos sharing the query's label (masks are boolean)."""
    if not query.any() or not index.any():
        return float("nan")
    emb = _normalise(embeddings)
    sims = emb[query] @ emb[index].T
    k = min(k, int(index.sum()))
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return float((labels[index][nearest] == labels[query][:, None]).mean())


def same_listing_recall(
    embeddings: np.ndarray, listing_ids: Sequence[str], query: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Recall@k of finding another photo of the query's listing in the whole set (itself excluded);
    queries are the photos selected by `query` whose listing has >= 2 photos."""
    ids = np.asarray(listing_ids)
    counts: dict[str, int] = {}
    for pid in ids:
        counts[pid] = counts.get(pid, 0) + 1
    selected = np.flatnonzero(query & np.array([counts[p] >= 2 for p in ids]))
    if len(selected) == 0:
        return {k: float("nan") for k in ks}
    emb = _normalise(embeddings)
    hits = {k: 0 for k in ks}
    for start in range(0, len(selected), 256):
        rows = selected[start : start + 256]
        sims = emb[rows] @ emb.T
        sims[np.arange(len(rows)), rows] = -np.inf
        order = np.argsort(-sims, axis=1)[:, : max(ks)]
        same = ids[order] == ids[rows][:, None]
        for k in ks:
            hits[k] += int(same[:, :k].any(axis=1).sum())
    return {k: hits[k] / len(selected) for k in ks}


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    splits: Sequence[str],
    listing_ids: Sequence[str],
    *,
    query_split: str = "test",
    index_split: str = "train",
) -> dict:
    """precision@10 against the `index_split` photos, and same-listing recall@k with the whole
    catalogue as gallery (the headline) and with only the `query_split` photos as gallery."""
    splits = np.asarray(splits)
    labels = np.asarray(labels)
    ids = np.asarray(listing_ids)
    query = splits == query_split
    catalogue = same_listing_recall(embeddings, ids, query, (1, 5, 10))
    within = same_listing_recall(
        np.asarray(embeddings)[query], ids[query], np.ones(int(query.sum()), bool), (1, 5, 10)
    )
    multi = {p for p, n in zip(*np.unique(ids[query], return_counts=True)) if n >= 2}
    return {
        "precision_at_10": precision_at_k(embeddings, labels, query, splits == index_split, 10),
        "same_listing_recall_at_1": catalogue[1],
        "same_listing_recall_at_5": catalogue[5],
        "same_listing_recall_at_10": catalogue[10],
        "same_listing_queries": int(sum(1 for p in ids[query] if p in multi)),
        "gallery": f"all {len(ids)} catalogue photos",
        f"{query_split}_gallery": {
            "same_listing_recall_at_1": within[1],
            "same_listing_recall_at_5": within[5],
            "same_listing_recall_at_10": within[10],
            "gallery": f"the {int(query.sum())} {query_split} photos",
        },
        "query_split": query_split,
        "index_split": index_split,
    }


# --------------------------------------------------------------------------- pictures


def plot_confusion(
    matrix: Sequence[Sequence[int]],
    categories: Sequence[str],
    path: Path,
    title: str = "Confusion matrix (test photos)",
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    rows = matrix.sum(axis=1, keepdims=True)
    share = matrix / np.maximum(rows, 1)
    fig, ax = plt.subplots(figsize=(10, 8.5))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(len(categories)), categories, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(categories)), categories, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_curves(history: Sequence[dict], path: Path, title: str = "Training curves") -> Path:
    """Loss and accuracy per epoch for train and valid (keys train_loss, valid_loss, train_acc,
    valid_acc; missing values are skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, style in (
        ("train_loss", loss_ax, "-"),
        ("valid_loss", loss_ax, "--"),
        ("train_acc", acc_ax, "-"),
        ("valid_acc", acc_ax, "--"),
    ):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(
                epochs,
                [np.nan if v is None else v for v in values],
                style,
                marker="o",
                markersize=3,
                label=key.replace("_", " "),
            )
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("top-1 accuracy (photos)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
