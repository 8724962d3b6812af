"""The model artefact directory: the one declaration of its file names, and the reader and writer
of its embeddings. Needs only NumPy, so the gateway and the indexer can read an artefact without
torch; the model weights and card are written by `common.model.save_artifact`, the text heads by
`common.text.TextHead.save`.

Layout (one writer per file)::

    model_card.json          the image model's card                       common.model.save_artifact
    model.safetensors        ListingModel weights (no pickle)             common.model.save_artifact
    labels.json              {"version": 1, "categories": [...]}          common.model.save_artifact
    model.onnx               the same model for ONNX Runtime / OpenVINO   common.model.add_runtime_files
    model.int8.onnx          opt-in int8 quantisation                     common.model.add_runtime_files
    check_photos/            photos every runtime is compared on at load  common.model.add_runtime_files
    metrics.json, train_config.json, predictions.csv, confusion_matrix.png, training_curves.png
                                                                          training.export
    embeddings/image_embeddings.npy   float32 (N, D), unit-norm rows      write_image_embeddings
    embeddings/image_ids.json         [image_id, ...] in the same order   write_image_embeddings
    embeddings/image_embeddings.json  {image_id: [floats]} (the baseline project's format)
    embeddings/images.csv             image_id, product_id, main_category, split (same order)
    text_card.json, text_head.safetensors, text_vocab.json, text_finetuned.safetensors
                                                                          common.text.TextHead.save
    text_metrics.json, text_finetune_curve.png                            training.text
    fusion_weights.json, fusion_weights.png                               common.fusion_weights
    embeddings/text_embeddings.npy    float32 (L, 384), one row a listing write_text_embeddings
    embeddings/text_ids.json          [listing id, ...] in the same order write_text_embeddings
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CARD_FILE = "model_card.json"
WEIGHTS_FILE = "model.safetensors"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"
TRAIN_CONFIG_FILE = "train_config.json"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
TRAINING_CURVES_FILE = "training_curves.png"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
CHECK_PHOTOS_DIR = "check_photos"

TEXT_HEAD_FILE = "text_head.safetensors"
TEXT_CARD_FILE = "text_card.json"
TEXT_VOCAB_FILE = "text_vocab.json"
TEXT_FINETUNED_FILE = "text_finetuned.safetensors"
TEXT_METRICS_FILE = "text_metrics.json"
TEXT_FINETUNE_CURVE_FILE = "text_finetune_curve.png"
#: The gateway's default fusion weights chosen on valid (`common.fusion_weights`) and their curves.
FUSION_WEIGHTS_FILE = "fusion_weights.json"
FUSION_WEIGHTS_PLOT_FILE = "fusion_weights.png"

EMBEDDINGS_DIR = "embeddings"
IMAGE_EMBEDDINGS_FILE = "image_embeddings.npy"
IMAGE_IDS_FILE = "image_ids.json"
IMAGE_EMBEDDINGS_JSON_FILE = "image_embeddings.json"
EMBEDDED_IMAGES_FILE = "images.csv"
TEXT_EMBEDDINGS_FILE = "text_embeddings.npy"
TEXT_IDS_FILE = "text_ids.json"

#: What a complete image-model artefact holds (the card is written last; see training.export).
REQUIRED_FILES = (
    CARD_FILE,
    WEIGHTS_FILE,
    LABELS_FILE,
    METRICS_FILE,
    f"{EMBEDDINGS_DIR}/{IMAGE_EMBEDDINGS_FILE}",
    f"{EMBEDDINGS_DIR}/{IMAGE_IDS_FILE}",
    f"{EMBEDDINGS_DIR}/{IMAGE_EMBEDDINGS_JSON_FILE}",
)


def artifact_complete(directory: Path | str) -> bool:
    """Whether every required file of an exported image model is there."""
    directory = Path(directory)
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def read_card(directory: Path | str) -> dict:
    """The image model's card (`CARD_FILE`) as a dict; `FileNotFoundError` when absent."""
    return json.loads((Path(directory) / CARD_FILE).read_text())


def write_image_embeddings(
    directory: Path | str, image_ids: Sequence[str], embeddings: np.ndarray, table: Any = None
) -> None:
    """The catalogue photos' embeddings as .npy + ids, as the baseline project's JSON
    {id: [floats]}, and (with `table`, a pandas DataFrame) which listing, category and split each
    row is. (pandas is not imported here: the services read artefacts without it.)"""
    out = Path(directory) / EMBEDDINGS_DIR
    out.mkdir(parents=True, exist_ok=True)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    np.save(out / IMAGE_EMBEDDINGS_FILE, embeddings)
    (out / IMAGE_IDS_FILE).write_text(json.dumps(list(image_ids)))
    with open(out / IMAGE_EMBEDDINGS_JSON_FILE, "w") as handle:  # streamed: ~10 bytes per float
        handle.write("{")
        for i, (image_id, row) in enumerate(zip(image_ids, embeddings)):
            numbers = ",".join(f"{x:.7g}" for x in row.tolist())
            handle.write(f"{',' if i else ''}\n{json.dumps(image_id)}: [{numbers}]")
        handle.write("\n}\n")
    if table is not None:
        table.to_csv(out / EMBEDDED_IMAGES_FILE, index=False)


def write_text_embeddings(directory: Path | str, listing_ids: Sequence[str], embeddings: np.ndarray) -> None:
    """The listings' text embeddings (row i is listing ``listing_ids[i]``) and their ids."""
    out = Path(directory) / EMBEDDINGS_DIR
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / TEXT_EMBEDDINGS_FILE, np.asarray(embeddings, dtype=np.float32))
    (out / TEXT_IDS_FILE).write_text(json.dumps(list(listing_ids)) + "\n")


def read_image_embeddings(directory: Path | str) -> tuple[list[str], np.ndarray]:
    """(image ids, float32 vectors) of an artefact; `FileNotFoundError` when it has none."""
    folder = Path(directory) / EMBEDDINGS_DIR
    vectors_path, ids_path = folder / IMAGE_EMBEDDINGS_FILE, folder / IMAGE_IDS_FILE
    if not vectors_path.is_file() or not ids_path.is_file():
        raise FileNotFoundError(
            f"{folder} lacks {IMAGE_EMBEDDINGS_FILE} and {IMAGE_IDS_FILE}; export "
            "embeddings with the model or use --prepared with --embedder"
        )
    return _read_pair(vectors_path, ids_path, "image_ids")


def read_text_embeddings(directory: Path | str) -> tuple[list[str], np.ndarray] | None:
    """(listing ids, float32 text vectors) of an artefact; None when it has none."""
    folder = Path(directory) / EMBEDDINGS_DIR
    vectors_path, ids_path = folder / TEXT_EMBEDDINGS_FILE, folder / TEXT_IDS_FILE
    if not vectors_path.is_file() or not ids_path.is_file():
        return None
    return _read_pair(vectors_path, ids_path, "listing_ids")


def _read_pair(vectors_path: Path, ids_path: Path, ids_key: str) -> tuple[list[str], np.ndarray]:
    vectors = np.load(vectors_path, allow_pickle=False).astype(np.float32, copy=False)
    ids = json.loads(ids_path.read_text())
    if isinstance(ids, dict):
        ids = ids.get(ids_key) or ids.get("ids")
    if not isinstance(ids, list) or vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(
            f"{ids_path} and {vectors_path} disagree: {len(ids or [])} ids, vectors of shape {vectors.shape}"
        )
    return [str(i) for i in ids], vectors
