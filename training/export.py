"""Write a trained model as a versioned artefact directory (the layout: `common.artifact`).

What this module writes itself: ``metrics.json`` (valid/test classification at image and listing
level, per class, confusion matrix, retrieval, definitions, training history), ``train_config.json``,
``predictions.csv`` (image_id, product_id, split, true and predicted category, probability),
``confusion_matrix.png`` (test photos) and ``training_curves.png``; the weights, labels and card go
through `common.model.save_artifact` (the card carries the headline metrics, data fingerprint,
train config, train_key, timings and model_version), the embeddings through
`common.artifact.write_image_embeddings`, and ``model.onnx`` with its check photos through
`common.model.add_runtime_files` (``model.int8.onnx`` only with ``python -m training.runtimes --int8``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common.artifact import (
    CARD_FILE,
    CONFUSION_MATRIX_FILE,
    EMBEDDINGS_DIR,
    IMAGE_EMBEDDINGS_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    TRAIN_CONFIG_FILE,
    TRAINING_CURVES_FILE,
    write_image_embeddings,
)
from common.model import CALIBRATION_PHOTO_COUNT, CHECK_PHOTO_COUNT, add_runtime_files, save_artifact
from training.dataset import TrainingPhotos
from training.evaluate import plot_confusion, plot_curves, softmax
from training.result import Headline, TrainResult


def _round(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def export_artifact(
    directory: Path, result: TrainResult, photos: TrainingPhotos, metrics: dict, *, train_key: str
) -> dict:
    """Write every file of the artefact; return the model card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (CARD_FILE,):  # an interrupted export must not look complete
        (directory / stale).unlink(missing_ok=True)
    config = result.config
    headline = _round(Headline.from_metrics(metrics).to_json())
    best_epoch = next((h["best_epoch"] for h in result.history if "best_epoch" in h), None)
    images = photos.images
    # Embeddings and pictures first, the card last: its presence marks a complete artefact.
    write_image_embeddings(
        directory,
        images["image_id"].tolist(),
        result.embeddings,
        images[["image_id", "product_id", "main_category", "split"]],
    )
    history = [h for h in result.history if "epoch" in h]
    files = {"embeddings": f"{EMBEDDINGS_DIR}/{IMAGE_EMBEDDINGS_FILE}"}
    if "test" in metrics:
        plot_confusion(
            metrics["test"]["confusion_matrix"],
            photos.categories,
            directory / CONFUSION_MATRIX_FILE,
            title=f"{config.name}: test photos (top-1 {metrics['test']['image_top1']:.1%})",
        )
        files["confusion_matrix"] = CONFUSION_MATRIX_FILE
    if history:
        plot_curves(history, directory / TRAINING_CURVES_FILE, title=f"{config.name} ({config.mode})")
        files["training_curves"] = TRAINING_CURVES_FILE
    probs = softmax(result.logits)
    predicted = probs.argmax(1)
    pd.DataFrame(
        {
            "image_id": images["image_id"],
            "product_id": images["product_id"],
            "split": images["split"],
            "true": images["main_category"],
            "predicted": [photos.categories[i] for i in predicted],
            "probability": probs.max(1).round(4),
        }
    ).to_csv(directory / PREDICTIONS_FILE, index=False)
    (directory / TRAIN_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    full = {
        "summary": headline,
        **_round(metrics),
        "history": _round(result.history),
        "timings_s": _round(result.timings),
        "data_fingerprint": photos.fingerprint,
    }
    (directory / METRICS_FILE).write_text(json.dumps(full, indent=2))
    embedding = {
        "dim": int(result.embeddings.shape[1]),
        "normalised": True,
        "source": "pooled backbone features (ListingModel.embed_and_classify)",
        "count": int(len(result.embeddings)),
    }
    save_artifact(
        directory,
        result.model,
        photos.categories,
        name=config.name,
        mode=config.mode,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        data_fingerprint=photos.fingerprint,
        data_dir=str(photos.data_dir),
        data_counts={s: int(photos.mask(s).sum()) for s in ("train", "valid", "test")},
        metrics=headline,
        best_epoch=best_epoch,
        train_config=config.to_dict(),
        train_key=train_key,
        timings_s=_round(result.timings),
        embedding=embedding,
        files=files | {"metrics": METRICS_FILE, "predictions": PREDICTIONS_FILE},
    )
    return write_runtime_files(directory, result.model, photos)


def spread(files: list[Path], count: int) -> list[Path]:
    """``count`` files evenly spread over ``files`` (a fixed choice, every category likely)."""
    if len(files) <= count:
        return list(files)
    return [files[round(i * (len(files) - 1) / (count - 1))] for i in range(count)]


def write_runtime_files(directory: Path, model, photos: TrainingPhotos, *, int8: bool = False) -> dict:
    """The ONNX model and check photos from the validation split for the embedder's runtimes;
    with ``int8`` also the int8 quantisation calibrated on training photos (opt-in: a few
    minutes more, and on EfficientNet-Lite0 on an AVX2 CPU it fails the check, see
    common.runtimes)."""
    files = photos.files
    valid = [files[i] for i in np.flatnonzero(photos.mask("valid"))]
    train = [files[i] for i in np.flatnonzero(photos.mask("train"))]
    return add_runtime_files(
        directory,
        model=model,
        check_photos=spread(valid or train, CHECK_PHOTO_COUNT),
        calibration_photos=spread(train, CALIBRATION_PHOTO_COUNT) if int8 else [],
    )
