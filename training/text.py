"""Listing text embeddings, a text-only category classifier and a text+image fusion, next to an
exported image artefact.

    python -m training.text --data build/data --artifact artifacts/<run> [--out DIR]

What it does (every number is listing level: one prediction per listing, on the listing splits
of ``images.csv``, which are grouped by listing and by shared photo, so nothing leaks):

1. Listing text = `common.text.listing_text(title, description)` (the scraped "Posted by ... in
   <category>" footer, which names the label, is removed). Embedded with all-MiniLM-L6-v2
   (384-d unit vectors) for every listing in ``listings.csv``; cached on disk by text hash.
2. Text-only heads, each a multinomial logistic regression with C chosen on valid:
   ``minilm`` on the embeddings and ``tfidf`` on TF-IDF word 1-2-grams of the same text (fit on
   the training texts only). Two training sets are compared on validation:
   ``train``        the train-split listings (those with photos), and
   ``train+extra``  the same plus the listings that have no photo in this subset (a different
                    set of listings, never in valid/test; any whose text is a near-duplicate,
                    cosine >= 0.95, of a valid/test listing is dropped first).
   The better on validation is exported; the metrics keep both.
   With ``--finetune-epochs N`` (opt-in; default 0), MiniLM
   itself is also fine-tuned end to end on the chosen training set (`training.text_finetune`:
   about 8 minutes an epoch on 2 cores, cached): a third text source, ``finetuned``, which both
   fusions then take as an input; the table also shows what the frozen sources alone give.
3. Image model: the artefact's ``embed_and_classify`` on every valid/test photo (cached by model
   version), log of the mean softmax over a listing's photos.
4. Fusions, fit on the validation split only, of per-source log-probabilities: text-only
   (minilm + tfidf [+ finetuned]) and text+image (the same + image). Candidates: "weighted"
   (p ~ exp(sum_k a_k log p_k), the a_k >= 0 minimising validation NLL: temperature scaling and
   mixing in one) and "stacking" (logistic regression over the concatenated log-probs, C on a
   grid). Each scored by 5-fold cross-validation on valid; the best is refit on all of valid.
   The test split is used only for the final table (and for nothing else).
5. Outputs in the artefact directory (or ``--out``): ``text_head.safetensors`` +
   ``text_vocab.json`` + ``text_card.json`` (read with `common.text.TextHead`, NumPy only;
   with fine-tuning also ``text_finetuned.safetensors`` and the curve
   ``text_finetune_curve.png``),
   ``text_metrics.json``, and ``embeddings/text_embeddings.npy`` (float32, N x 384) +
   ``embeddings/text_ids.json`` (listing ids, same order: every listing in listings.csv) for the
   indexer's "text" collection.
6. The gateway's default fusion weights (hybrid Search and SimilarListings text weights), chosen
   on the valid split for this image model by `training.fusion_weights` when the artefact exports
   image embeddings: ``fusion_weights.json`` + ``fusion_weights.png`` (the valid curves).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from common.artifact import TEXT_FINETUNE_CURVE_FILE, TEXT_METRICS_FILE, read_card, write_text_embeddings
from common.files import sha256_file
from common.prepared_data import SPLITS
from common.prepared_data.frames import load_prepared
from common.text import (
    TEXT_DIM,
    TFIDF_TOKEN_PATTERN,
    TEXT_MODEL_NAME,
    TextEncoder,
    TextHead,
    image_listing_log_probs,
    listing_text,
)
from training.dataset import DEFAULT_OUT_DIR
from training.text_finetune import FinetuneConfig, finetune, plot_history

log = logging.getLogger("training.text")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / "build" / "cache" / "text"
C_GRID = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
TFIDF_C_GRID = (5.0, 20.0, 50.0)
TFIDF_MIN_DF = 2
STACK_C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
NEAR_DUPLICATE_COSINE = 0.95
SEED = 42


# ============================================================================ data


def listing_splits(images: pd.DataFrame) -> pd.Series:
    """product_id -> split, from images.csv; a listing whose photos span splits is an error."""
    per_listing = images.groupby("product_id")["split"].agg(lambda s: sorted(set(s)))
    spanning = per_listing[per_listing.map(len) > 1]
    if len(spanning):
        raise ValueError(
            f"{len(spanning)} listings have photos in several splits, e.g. "
            f"{spanning.index[:3].tolist()}; re-run training.prepare"
        )
    return per_listing.map(lambda s: s[0])


def listing_texts(listings: pd.DataFrame) -> list[str]:
    return [listing_text(t, d) for t, d in zip(listings["title"], listings["description"])]


# ============================================================================ caches


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Text -> embedding, stored as one .npz (keys = sha256 of the text) per model version."""

    def __init__(self, cache_dir: Path, model_version: str) -> None:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_version)
        self.path = Path(cache_dir) / f"text_embeddings_{safe}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.is_file():
            with np.load(self.path, allow_pickle=False) as data:
                self.vectors = dict(zip(data["keys"].tolist(), data["vectors"]))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(sorted(self.vectors))
        vectors = (
            np.stack([self.vectors[k] for k in keys]) if len(keys) else np.zeros((0, TEXT_DIM), np.float32)
        )
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=keys, vectors=vectors.astype(np.float32))
        os.replace(tmp, self.path)


def embed_texts(
    texts: list[str],
    *,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    encoder: TextEncoder | None = None,
    chunk: int = 256,
) -> np.ndarray:
    """Embed texts with MiniLM, computing only those not cached yet (the model is loaded only
    when something is missing)."""
    model_version = f"{TEXT_MODEL_NAME}-gt-0.1.0"
    cache = EmbeddingCache(cache_dir, model_version)
    keys = [_text_key(t) for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in cache.vectors}.items())
    if todo:
        encoder = encoder or TextEncoder()
        log.info("embedding %d distinct new texts (of %d)", len(todo), len(texts))
        start = time.time()
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            vectors = encoder.encode([t for _, t in part])
            cache.vectors.update({k: v for (k, _), v in zip(part, vectors)})
            cache.save()  # an interrupted run keeps what it did
            log.info("  %d/%d texts, %.0f s", min(i + chunk, len(todo)), len(todo), time.time() - start)
    return (
        np.stack([cache.vectors[k] for k in keys]).astype(np.float32)
        if keys
        else np.zeros((0, TEXT_DIM), np.float32)
    )


def image_logits(
    artifact_dir: Path,
    data_dir: Path,
    images: pd.DataFrame,
    *,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    batch_size: int = 32,
) -> np.ndarray:
    """Per-photo logits of the artefact's image model (rows follow ``images``), cached by the
    artefact's model version and the sha256 of the prepared photo file."""
    card = read_card(artifact_dir)
    version = str(card["model_version"])
    path = Path(cache_dir) / f"image_logits_{version}.npz"
    cached: dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            cached = dict(zip(data["keys"].tolist(), data["logits"]))
    keys = [sha256_file(Path(data_dir) / p) for p in images["path"]]  # the bytes the model sees
    todo = [(k, p) for k, p in zip(keys, images["path"]) if k not in cached]
    if todo:
        import torch

        from common.images import open_image
        from common.model import load_artifact

        artifact = load_artifact(artifact_dir)
        transform = artifact.preprocessing.transform()
        log.info("image model %s on %d photos (%d cached)", version, len(todo), len(keys) - len(todo))
        start = time.time()
        with torch.inference_mode():
            for i in range(0, len(todo), batch_size):
                part = todo[i : i + batch_size]
                batch = torch.stack([transform(open_image(Path(data_dir) / p)) for _, p in part])
                _, logits = artifact.model.embed_and_classify(batch)
                cached.update({k: row for (k, _), row in zip(part, logits.float().numpy())})
                if (i // batch_size) % 8 == 0:
                    log.info(
                        "  %d/%d photos, %.0f s",
                        min(i + batch_size, len(todo)),
                        len(todo),
                        time.time() - start,
                    )
        path.parent.mkdir(parents=True, exist_ok=True)
        names = sorted(cached)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(names), logits=np.stack([cached[k] for k in names]))
        os.replace(tmp, path)
    return np.stack([cached[k] for k in keys]).astype(np.float64)


# ============================================================================ models


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fit_logreg(x, y: np.ndarray, c: float, num_classes: int):
    """Multinomial logistic regression (dense or sparse x) -> (weight (C, d), bias (C,)) over
    all classes (a class absent from ``y`` gets a very negative bias)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=3000, tol=1e-5)
    model.fit(x, y)
    weight = np.zeros((num_classes, x.shape[1]))
    bias = np.full(num_classes, -30.0)
    if len(model.classes_) == 2:  # sklearn keeps one row: the log-odds of the second class
        weight[model.classes_[1]], bias[model.classes_[1]] = model.coef_[0], model.intercept_[0]
        bias[model.classes_[0]] = 0.0
    else:
        weight[model.classes_] = model.coef_
        bias[model.classes_] = model.intercept_
    return weight, bias


def logreg_log_probs(x, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return _log_softmax(np.asarray(x @ weight.T) + bias)


def accuracy(log_probs: np.ndarray, y: np.ndarray) -> float:
    return float((log_probs.argmax(axis=1) == y).mean()) if len(y) else float("nan")


def nll(log_probs: np.ndarray, y: np.ndarray) -> float:
    return float(-log_probs[np.arange(len(y)), y].mean())


def _folds(y: np.ndarray, k: int = 5):
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y)
    k = max(2, min(k, int(counts[counts > 0].min())))
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=SEED).split(np.zeros(len(y)), y))


def weighted_fusion_params(sources: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Non-negative weights a_k minimising the NLL of softmax(sum_k a_k * log p_k) on the given
    rows (temperature scaling of each source and their mix in one; L-BFGS-B, bounds [0, 10])."""
    from scipy.optimize import minimize

    stacked = np.stack(sources)  # (K, N, C)
    rows = np.arange(len(y))

    def objective(a):
        z = np.tensordot(a, stacked, axes=1)
        lp = _log_softmax(z)
        p = np.exp(lp)
        onehot = np.zeros_like(p)
        onehot[rows, y] = 1.0
        grad = np.einsum("knc,nc->k", stacked, p - onehot) / len(y)
        return -lp[rows, y].mean(), grad

    result = minimize(
        objective, np.ones(len(sources)), jac=True, method="L-BFGS-B", bounds=[(0.0, 10.0)] * len(sources)
    )
    return result.x


def choose_fusion(sources: list[np.ndarray], y: np.ndarray, num_classes: int) -> dict:
    """Cross-validate the fusion candidates of K sources' log-probs on validation rows and refit
    the best on all of them: "weighted" (``weighted_fusion_params``) or "stacking" (logistic
    regression over the concatenated log-probs, C on a grid). Picked by CV accuracy, then CV
    NLL. Returns {"kind", "name", "params", "weight" (C, KC), "bias" (C,), "cv"}."""
    folds = _folds(y)
    features = np.hstack(sources)
    eye = np.eye(num_classes)
    cv: dict[str, dict] = {}

    def score(predict) -> dict:
        out = np.zeros((len(y), num_classes))
        for train_idx, held_idx in folds:
            out[held_idx] = predict(train_idx, held_idx)
        return {"accuracy": round(accuracy(out, y), 4), "nll": round(nll(out, y), 4)}

    def weighted(train_idx, held_idx):
        a = weighted_fusion_params([s[train_idx] for s in sources], y[train_idx])
        return _log_softmax(sum(w * s[held_idx] for w, s in zip(a, sources)))

    cv["weighted"] = score(weighted)
    for c in STACK_C_GRID:

        def stacked(train_idx, held_idx, c=c):
            w, bias = fit_logreg(features[train_idx], y[train_idx], c, num_classes)
            return logreg_log_probs(features[held_idx], w, bias)

        cv[f"stacking_C={c:g}"] = score(stacked)
    best = max(cv, key=lambda name: (cv[name]["accuracy"], -cv[name]["nll"]))
    if best == "weighted":
        a = weighted_fusion_params(sources, y)
        weight, bias = np.hstack([w * eye for w in a]), np.zeros(num_classes)
        params = {"weights": [round(float(w), 4) for w in a]}
    else:
        c = float(best.split("=")[1])
        weight, bias = fit_logreg(features, y, c, num_classes)
        params = {"C": c}
    return {
        "kind": best.split("_C=")[0],
        "name": best,
        "params": params,
        "weight": weight,
        "bias": bias,
        "cv": cv,
    }


def apply_fusion(fusion: dict, sources: list[np.ndarray]) -> np.ndarray:
    return _log_softmax(np.hstack(sources) @ fusion["weight"].T + fusion["bias"])


def near_duplicates(
    candidates: np.ndarray, protected: np.ndarray, threshold: float = NEAR_DUPLICATE_COSINE
) -> np.ndarray:
    """Boolean mask over ``candidates`` rows whose best cosine to any ``protected`` row is
    >= threshold (both unit-norm)."""
    if not len(candidates) or not len(protected):
        return np.zeros(len(candidates), bool)
    best = np.concatenate(
        [(candidates[s : s + 1024] @ protected.T).max(axis=1) for s in range(0, len(candidates), 1024)]
    )
    return best >= threshold


def fit_tfidf(texts: list[str], min_df: int = TFIDF_MIN_DF):
    """scikit-learn TF-IDF of word 1-2-grams, fit on training texts only; what
    `common.text.TfidfFeatures` reproduces at serving time."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(
        ngram_range=(1, 2),
        min_df=min_df,
        sublinear_tf=True,
        lowercase=True,
        token_pattern=TFIDF_TOKEN_PATTERN,
        norm="l2",
        dtype=np.float64,
    )
    vectorizer.fit(texts)
    return vectorizer


def select_c(fit, grid, x_valid, y_valid) -> tuple[float, dict]:
    """Fit for every C in ``grid``; return the C with the best validation accuracy (then NLL)
    and {C: (accuracy, -nll, weight, bias)}."""
    results = {}
    for c in grid:
        w, b = fit(c)
        lp = logreg_log_probs(x_valid, w, b)
        results[c] = (accuracy(lp, y_valid), -nll(lp, y_valid), w, b)
    return max(results, key=lambda c: results[c][:2]), results


# ============================================================================ pipeline


def train_text_heads(
    texts: list[str], embeddings: np.ndarray, y: np.ndarray, train_idx, valid_idx, num_classes: int
) -> dict:
    """MiniLM and TF-IDF heads on one training set, each C chosen on validation."""
    c_minilm, grid_m = select_c(
        lambda c: fit_logreg(embeddings[train_idx], y[train_idx], c, num_classes),
        C_GRID,
        embeddings[valid_idx],
        y[valid_idx],
    )
    vectorizer = fit_tfidf([texts[i] for i in train_idx])
    x_train = vectorizer.transform([texts[i] for i in train_idx])
    x_valid = vectorizer.transform([texts[i] for i in valid_idx])
    c_tfidf, grid_t = select_c(
        lambda c: fit_logreg(x_train, y[train_idx], c, num_classes), TFIDF_C_GRID, x_valid, y[valid_idx]
    )
    m_valid = logreg_log_probs(embeddings[valid_idx], *grid_m[c_minilm][2:])
    t_valid = logreg_log_probs(x_valid, *grid_t[c_tfidf][2:])
    return {
        "train_listings": int(len(train_idx)),
        "minilm": {
            "C": c_minilm,
            "weight": grid_m[c_minilm][2],
            "bias": grid_m[c_minilm][3],
            "valid_top1_by_C": {f"{c:g}": round(v[0], 4) for c, v in grid_m.items()},
        },
        "tfidf": {
            "C": c_tfidf,
            "weight": grid_t[c_tfidf][2],
            "bias": grid_t[c_tfidf][3],
            "vectorizer": vectorizer,
            "vocabulary_size": len(vectorizer.vocabulary_),
            "valid_top1_by_C": {f"{c:g}": round(v[0], 4) for c, v in grid_t.items()},
        },
        "valid_top1": {
            "minilm": accuracy(m_valid, y[valid_idx]),
            "tfidf": accuracy(t_valid, y[valid_idx]),
            "minilm+tfidf (sum)": accuracy(m_valid + t_valid, y[valid_idx]),
        },
    }


def run(
    data_dir: Path,
    artifact_dir: Path,
    out_dir: Path,
    *,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    extra_text: str = "auto",
    finetune_epochs: int = 0,
    finetune_lr: float = FinetuneConfig.lr,
) -> dict:
    """The whole pipeline; returns the metrics dict (also written to text_metrics.json)."""
    listings, images, categories = load_prepared(data_dir)
    card = read_card(artifact_dir)
    if list(card["categories"]) != list(categories):
        raise ValueError(f"artefact categories {card['categories']} differ from labels.json")
    num_classes = len(categories)
    label_of = {name: k for k, name in enumerate(categories)}
    listings = listings.reset_index(drop=True)
    split_of = listing_splits(images)
    listings["split"] = listings["product_id"].map(split_of).fillna("no_photo")
    listings["label"] = listings["main_category"].map(label_of)
    if listings["label"].isna().any():
        raise ValueError("listings.csv has main categories missing from labels.json")
    listings["label"] = listings["label"].astype(int)

    # 1. listing text and its embedding, every listing
    texts = listing_texts(listings)
    embeddings = embed_texts(texts, cache_dir=cache_dir)
    rows = {s: np.flatnonzero(listings["split"].to_numpy() == s) for s in (*SPLITS, "no_photo")}
    y = listings["label"].to_numpy()
    counts = {s: int(len(r)) for s, r in rows.items()}
    log.info("listings per split: %s", counts)

    # 2. text heads on train and on train + photo-less listings (near-duplicates removed)
    protected = embeddings[np.concatenate([rows["valid"], rows["test"]])]
    extra = rows["no_photo"]
    dup = near_duplicates(embeddings[extra], protected)
    extra_kept = extra[~dup]
    train_sets = {"train": rows["train"]}
    if extra_text != "no":
        train_sets["train+extra"] = np.concatenate([rows["train"], extra_kept])
    heads = {
        name: train_text_heads(texts, embeddings, y, idx, rows["valid"], num_classes)
        for name, idx in train_sets.items()
    }
    for name, h in heads.items():
        log.info(
            "text heads on %s (%d listings): valid %s",
            name,
            h["train_listings"],
            {k: round(v, 3) for k, v in h["valid_top1"].items()},
        )
    if extra_text == "yes":
        chosen = "train+extra"
    elif extra_text == "no":
        chosen = "train"
    else:  # auto: pick on validation
        chosen = max(heads, key=lambda n: heads[n]["valid_top1"]["minilm+tfidf (sum)"])
    h = heads[chosen]
    vectorizer = h["tfidf"]["vectorizer"]
    vocabulary = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
    tensors = {
        "minilm.weight": h["minilm"]["weight"],
        "minilm.bias": h["minilm"]["bias"],
        "tfidf.idf": vectorizer.idf_,
        "tfidf.weight": h["tfidf"]["weight"],
        "tfidf.bias": h["tfidf"]["bias"],
    }

    # 2b. optionally MiniLM fine-tuned end to end on the same training listings
    finetuned, finetune_config, finetune_history = None, None, []
    if finetune_epochs > 0:
        finetune_config = FinetuneConfig(epochs=finetune_epochs, lr=finetune_lr)
        train_idx = train_sets[chosen]
        finetuned, finetune_history = finetune(
            [texts[i] for i in train_idx],
            y[train_idx],
            categories,
            valid_texts=[texts[i] for i in rows["valid"]],
            valid_labels=y[rows["valid"]],
            config=finetune_config,
            cache_dir=cache_dir,
        )
    text_inputs = (["finetuned"] if finetuned is not None else []) + ["minilm", "tfidf"]
    bare = TextHead(
        categories,
        tensors,
        vocabulary,
        {"text_fusion_inputs": text_inputs, "fusion_inputs": text_inputs + ["image"]},
        finetuned,
    )

    # 3. image-model log-probs per listing, valid and test
    eval_images = images[images["split"].isin(["valid", "test"])].reset_index(drop=True)
    logits = image_logits(artifact_dir, data_dir, eval_images, cache_dir=cache_dir)
    image_ids, image_lp = image_listing_log_probs(logits, eval_images["product_id"].tolist())
    image_lp_of = dict(zip(image_ids, image_lp))

    def sources(split: str) -> dict[str, np.ndarray]:
        idx = rows[split]
        out = bare.source_log_probs(embeddings[idx], [texts[i] for i in idx])
        out["image"] = np.stack([image_lp_of[pid] for pid in listings["product_id"].to_numpy()[idx]])
        return out

    s_valid, s_test = sources("valid"), sources("test")
    y_valid, y_test = y[rows["valid"]], y[rows["test"]]
    # the NumPy TF-IDF the services use must give scikit-learn's numbers
    sk_valid = logreg_log_probs(
        vectorizer.transform([texts[i] for i in rows["valid"]]), h["tfidf"]["weight"], h["tfidf"]["bias"]
    )
    drift = float(np.abs(sk_valid - s_valid["tfidf"]).max())
    if drift > 1e-6:
        raise RuntimeError(f"common.text.TfidfFeatures differs from scikit-learn by {drift}")

    # 4. fusions, chosen and fit on valid only
    def pick(names):
        return [s_valid[n] for n in names], [s_test[n] for n in names]

    fusions = {}
    candidates = [
        ("text", text_inputs),
        ("text+image", text_inputs + ["image"]),
        ("minilm+image", ["minilm", "image"]),
    ]
    if finetuned is not None:  # what the frozen sources alone give, for comparison
        candidates += [
            ("frozen text", ["minilm", "tfidf"]),
            ("frozen text+image", ["minilm", "tfidf", "image"]),
        ]
    for key, names in candidates:
        valid_sources, _ = pick(names)
        fusions[key] = choose_fusion(valid_sources, y_valid, num_classes)
        fusions[key]["inputs"] = names
        log.info(
            "fusion %s: %s %s (valid CV %s)",
            key,
            fusions[key]["name"],
            fusions[key]["params"],
            fusions[key]["cv"][fusions[key]["name"]],
        )

    def row(names, combine):
        v, t = pick(names)
        return {"valid": accuracy(combine(v), y_valid), "test": accuracy(combine(t), y_test)}

    def naive(parts):
        return _log_softmax(sum(parts))

    def fused(key):
        return row(fusions[key]["inputs"], lambda p: apply_fusion(fusions[key], p))

    table = {
        "image": row(["image"], lambda p: p[0]),
        "text: MiniLM embedding + logistic regression": row(["minilm"], lambda p: p[0]),
        "text: TF-IDF + logistic regression": row(["tfidf"], lambda p: p[0]),
    }
    if finetuned is not None:
        table["text: MiniLM fine-tuned end to end"] = row(["finetuned"], lambda p: p[0])
        table["text, frozen MiniLM + TF-IDF (fused)"] = fused("frozen text")
        table["text+image, frozen MiniLM + TF-IDF + image (fused)"] = fused("frozen text+image")
    table |= {
        "text": fused("text"),
        "text+image, naive sum of log-probs": row(text_inputs + ["image"], naive),
        "MiniLM embedding + image (fused)": fused("minilm+image"),
        "text+image": fused("text+image"),
    }

    # 5. the exported head, and its numbers re-computed from it
    tensors |= {
        "text_fusion.weight": fusions["text"]["weight"],
        "text_fusion.bias": fusions["text"]["bias"],
        "fusion.weight": fusions["text+image"]["weight"],
        "fusion.bias": fusions["text+image"]["bias"],
    }

    def describe(f):
        return {
            "kind": f["kind"],
            "name": f["name"],
            "params": f["params"],
            "inputs": f["inputs"],
            "fit_on": "valid",
            "valid_cv": f["cv"],
        }

    head = TextHead(categories, tensors, vocabulary, dict(bare.card), finetuned)
    test_idx = rows["test"]
    test_texts = [texts[i] for i in test_idx]
    exported_text = accuracy(np.log(head.predict_text(embeddings[test_idx], test_texts)), y_test)
    exported_fused = accuracy(
        np.log(head.predict_fused(embeddings[test_idx], s_test["image"], test_texts)), y_test
    )
    assert abs(exported_text - table["text"]["test"]) < 1e-9
    assert abs(exported_fused - table["text+image"]["test"]) < 1e-9

    pred = apply_fusion(fusions["text+image"], pick(text_inputs + ["image"])[1]).argmax(1)
    per_class = {
        name: {
            "listings": int((y_test == k).sum()),
            "text+image_top1": float((pred[y_test == k] == k).mean()) if (y_test == k).any() else None,
        }
        for k, name in enumerate(categories)
    }
    metrics = {
        "level": "listing",
        "split_listings": counts,
        "image_model_version": card["model_version"],
        "text_model": TEXT_MODEL_NAME,
        "top1": table,
        "text_heads": {
            n: {
                "train_listings": r["train_listings"],
                "valid_top1": r["valid_top1"],
                "minilm_C": r["minilm"]["C"],
                "tfidf_C": r["tfidf"]["C"],
                "tfidf_vocabulary": r["tfidf"]["vocabulary_size"],
                "minilm_valid_top1_by_C": r["minilm"]["valid_top1_by_C"],
                "tfidf_valid_top1_by_C": r["tfidf"]["valid_top1_by_C"],
            }
            for n, r in heads.items()
        },
        "text_heads_exported": chosen,
        "extra_text": {
            "listings_without_photos": int(len(extra)),
            "dropped_near_duplicates_of_valid_test": int(dup.sum()),
            "used": int(len(extra_kept)) if "train+extra" in train_sets else 0,
            "near_duplicate_cosine": NEAR_DUPLICATE_COSINE,
        },
        "fusions": {k: describe(f) for k, f in fusions.items()},
        "finetuned": None
        if finetuned is None
        else {
            **asdict(finetune_config),
            "train_listings": int(len(train_sets[chosen])),
            "trained_on": chosen,
            "history": finetune_history,
        },
        "image_aggregation": "log of mean softmax over a listing's photos",
        "test_per_class": per_class,
    }

    # 6. the gateway's default fusion weights, chosen on valid for this image model
    from training import fusion_weights

    out_dir = Path(out_dir)
    chosen_weights = fusion_weights.fit(
        data_dir,
        artifact_dir,
        out_dir,
        cache_dir=cache_dir,
        listings=listings,
        images=images,
        text_ids=listings["product_id"].tolist(),
        text_vectors=embeddings,
    )
    metrics["fusion_weights"] = (
        None
        if chosen_weights is None
        else {
            "search_text_weight": chosen_weights.search_text_weight,
            "similar_text_weight": chosen_weights.similar_text_weight,
            "valid_queries": chosen_weights.valid_queries,
            "valid_curves": chosen_weights.valid_curves,
        }
    )
    extra_card = {}
    if finetuned is not None:
        extra_card["finetuned"] = {k: v for k, v in metrics["finetuned"].items() if k != "history"}
        plot_history(finetune_history, out_dir / TEXT_FINETUNE_CURVE_FILE)
    head.save(
        out_dir,
        image_model_version=card["model_version"],
        text_heads_trained_on=chosen,
        minilm_C=h["minilm"]["C"],
        tfidf={"C": h["tfidf"]["C"], "min_df": TFIDF_MIN_DF},
        text_fusion=describe(fusions["text"]),
        fusion=describe(fusions["text+image"]),
        image_aggregation=metrics["image_aggregation"],
        test_top1={k: round(v["test"], 4) for k, v in table.items()},
        **extra_card,
    )
    write_text_embeddings(out_dir, listings["product_id"].tolist(), embeddings)
    (out_dir / TEXT_METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_table(metrics: dict) -> str:
    lines = [f"{'category top-1, listing level':52s} {'valid':>7s} {'test':>7s}"]
    for name, row in metrics["top1"].items():
        lines.append(f"{name:52s} {row['valid']:7.1%} {row['test']:7.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_OUT_DIR, help="prepared data folder")
    parser.add_argument("--artifact", type=Path, required=True, help="image model artefact dir")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the text head, metrics and text embeddings (default: the artefact directory)",
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument(
        "--extra-text",
        choices=("auto", "yes", "no"),
        default="auto",
        help="train the text heads also on listings without photos (auto: whichever scores better on valid)",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="also fine-tune MiniLM end to end for this many epochs (about 8 min "
        "an epoch on 2 cores; cached) as a third text source (default 0: "
        "frozen MiniLM and TF-IDF only; on the shared data 3 epochs gave "
        "no reliable gain, see training.text_finetune)",
    )
    parser.add_argument("--finetune-lr", type=float, default=FinetuneConfig.lr)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default, every core)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    metrics = run(
        args.data,
        args.artifact,
        args.out or args.artifact,
        cache_dir=args.cache,
        extra_text=args.extra_text,
        finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr,
    )
    print(format_table(metrics))
    print(
        f"text+image fusion: {metrics['fusions']['text+image']['name']} "
        f"{metrics['fusions']['text+image']['params']}; text heads trained on "
        f"{metrics['text_heads_exported']}"
    )
    if metrics.get("fusion_weights"):
        print(
            f"gateway fusion weights chosen on valid: search_text_weight="
            f"{metrics['fusion_weights']['search_text_weight']:.1f} similar_text_weight="
            f"{metrics['fusion_weights']['similar_text_weight']:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
