"""Write a trained model as a versioned artefact directory (see `common.model` for the core files).

Layout written here::

    model_card.json          backbone, input size, normalisation, embedding dim, categories, metrics
                             (headline), data fingerprint, created (UTC), train config, train_key,
                             timings, model_version
    model.safetensors        ListingModel weights (no pickle); also loadable with
                             safetensors.torch.load_file
    labels.json              label decoder {"version": 1, "categories": [...]}
    metrics.json             everything measured: valid/test classification (image and listing level,
                             per class, confusion matrix), retrieval, definitions, training history
    train_config.json        the TrainConfig that made it
    predictions.csv          image_id, product_id, split, true and predicted category, probability
    confusion_matrix.png     test photos
    training_curves.png      loss and accuracy per epoch
    embeddings/image_embeddings.npy   float32 (N, D), unit-norm rows, catalogue order
    embeddings/image_ids.json         [image_id, ...] in the same order
    embeddings/image_embeddings.json  {image_id: [floats]} (the original project's format)
    embeddings/images.csv             image_id, product_id, main_category, split (same order)
    model.onnx               the same model for ONNX Runtime / OpenVINO (`common.model.add_runtime_files`;
                             the card's ``runtimes`` entry: opset, checksums, versions at export)
    check_photos/            16 validation photos every runtime is compared with torch on at load
    model.int8.onnx          only with ``python -m training.runtimes --int8``: int8, calibrated on
                             300 training photos
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from common.model import (CALIBRATION_PHOTO_COUNT, CARD_FILE, CHECK_PHOTO_COUNT, LABELS_FILE,
                          WEIGHTS_FILE, add_runtime_files, save_artifact)
from training.evaluate import plot_confusion, plot_curves, softmax

if TYPE_CHECKING:
    from training.train import Catalogue, TrainResult

EMBEDDINGS_DIR = "embeddings"
EMBEDDINGS_NPY = "image_embeddings.npy"
EMBEDDINGS_IDS = "image_ids.json"
EMBEDDINGS_JSON = "image_embeddings.json"
EMBEDDINGS_CSV = "images.csv"
REQUIRED = (CARD_FILE, WEIGHTS_FILE, LABELS_FILE, "metrics.json",
            f"{EMBEDDINGS_DIR}/{EMBEDDINGS_NPY}", f"{EMBEDDINGS_DIR}/{EMBEDDINGS_IDS}",
            f"{EMBEDDINGS_DIR}/{EMBEDDINGS_JSON}")


def artifact_complete(directory: Path | str) -> bool:
    directory = Path(directory)
    return all((directory / name).is_file() for name in REQUIRED)


def _round(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def write_embeddings(directory: Path, image_ids: list[str], embeddings: np.ndarray,
                     table: pd.DataFrame | None = None) -> None:
    """The catalogue embeddings as .npy + ids, and as the original's JSON {id: [floats]}."""
    out = Path(directory) / EMBEDDINGS_DIR
    out.mkdir(parents=True, exist_ok=True)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    np.save(out / EMBEDDINGS_NPY, embeddings)
    (out / EMBEDDINGS_IDS).write_text(json.dumps(list(image_ids)))
    with open(out / EMBEDDINGS_JSON, "w") as handle:  # streamed: ~10 bytes per float
        handle.write("{")
        for i, (image_id, row) in enumerate(zip(image_ids, embeddings)):
            numbers = ",".join(f"{x:.7g}" for x in row.tolist())
            handle.write(f'{"," if i else ""}\n{json.dumps(image_id)}: [{numbers}]')
        handle.write("\n}\n")
    if table is not None:
        table.to_csv(out / EMBEDDINGS_CSV, index=False)


def export_artifact(directory: Path, result: "TrainResult", catalogue: "Catalogue", metrics: dict,
                    *, train_key: str) -> dict:
    """Write every file of the artefact; return the model card."""
    from training.train import summary

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (CARD_FILE,):  # an interrupted export must not look complete
        (directory / stale).unlink(missing_ok=True)
    config = result.config
    headline = _round(summary(metrics))
    best_epoch = next((h["best_epoch"] for h in result.history if "best_epoch" in h), None)
    images = catalogue.images
    # Embeddings and pictures first, the card last: its presence marks a complete artefact.
    write_embeddings(directory, images["image_id"].tolist(), result.embeddings,
                     images[["image_id", "product_id", "main_category", "split"]])
    history = [h for h in result.history if "epoch" in h]
    files = {"embeddings": f"{EMBEDDINGS_DIR}/{EMBEDDINGS_NPY}"}
    if "test" in metrics:
        plot_confusion(metrics["test"]["confusion_matrix"], catalogue.categories,
                       directory / "confusion_matrix.png",
                       title=f"{config.name}: test photos (top-1 {metrics['test']['image_top1']:.1%})")
        files["confusion_matrix"] = "confusion_matrix.png"
    if history:
        plot_curves(history, directory / "training_curves.png", title=f"{config.name} ({config.mode})")
        files["training_curves"] = "training_curves.png"
    probs = softmax(result.logits)
    predicted = probs.argmax(1)
    pd.DataFrame({
        "image_id": images["image_id"], "product_id": images["product_id"], "split": images["split"],
        "true": images["main_category"], "predicted": [catalogue.categories[i] for i in predicted],
        "probability": probs.max(1).round(4),
    }).to_csv(directory / "predictions.csv", index=False)
    (directory / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    full = {"summary": headline, **_round(metrics), "history": _round(result.history),
            "timings_s": _round(result.timings), "data_fingerprint": catalogue.fingerprint}
    (directory / "metrics.json").write_text(json.dumps(full, indent=2))
    embedding = {
        "dim": int(result.embeddings.shape[1]),
        "normalised": True,
        "source": "pooled backbone features (ListingModel.embed_and_classify)",
        "count": int(len(result.embeddings)),
    }
    save_artifact(
        directory, result.model, catalogue.categories,
        name=config.name,
        mode=config.mode,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        data_fingerprint=catalogue.fingerprint,
        data_dir=str(catalogue.data_dir),
        data_counts={s: int(catalogue.mask(s).sum()) for s in ("train", "valid", "test")},
        metrics=headline,
        best_epoch=best_epoch,
        train_config=config.to_dict(),
        train_key=train_key,
        timings_s=_round(result.timings),
        embedding=embedding,
        files=files | {"metrics": "metrics.json", "predictions": "predictions.csv"},
    )
    return write_runtime_files(directory, result.model, catalogue)


def spread(files: list[Path], count: int) -> list[Path]:
    """``count`` files evenly spread over ``files`` (a fixed choice, every category likely)."""
    if len(files) <= count:
        return list(files)
    return [files[round(i * (len(files) - 1) / (count - 1))] for i in range(count)]


def write_runtime_files(directory: Path, model, catalogue: "Catalogue", *,
                        int8: bool = False) -> dict:
    """The ONNX model and check photos from the validation split for the embedder's runtimes;
    with ``int8`` also the int8 quantisation calibrated on training photos (opt-in: a few
    minutes more, and on EfficientNet-Lite0 on an AVX2 CPU it fails the check, see
    common.runtimes)."""
    files = catalogue.files
    valid = [files[i] for i in np.flatnonzero(catalogue.mask("valid"))]
    train = [files[i] for i in np.flatnonzero(catalogue.mask("train"))]
    return add_runtime_files(directory, model=model,
                             check_photos=spread(valid or train, CHECK_PHOTO_COUNT),
                             calibration_photos=spread(train, CALIBRATION_PHOTO_COUNT)
                             if int8 else [])
