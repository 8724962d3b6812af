"""The listing model (backbone + category head) and its exported artefact directory.

Training writes an artefact with ``save_artifact``; the embedder loads it with ``load_artifact``.
Weights are stored as safetensors and everything else as JSON, so loading an artefact never
unpickles anything.

The file names and the rest of the layout are declared in `common.artifact`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from common.artifact import CARD_FILE, CHECK_PHOTOS_DIR, LABELS_FILE, ONNX_FILE, ONNX_INT8_FILE, WEIGHTS_FILE
from common.backbones import Backbone, Preprocessing, get_backbone
from common.files import sha256_file

#: Largest difference folding batch norms may make to an embedding or a probability; float32
#: rounding makes about 1e-6, a wrongly folded layer makes O(1).
FOLD_TOLERANCE = 1e-3

FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """An artefact directory is missing, incomplete or inconsistent; the message says how."""


class ListingModel(nn.Module):
    """Backbone features (the embedding) followed by a linear head over the main categories."""

    def __init__(
        self, backbone: Backbone, num_classes: int, *, pretrained: bool = True, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.backbone_name = backbone.name
        self.features = backbone.build(pretrained)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.embedding_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))

    def embed_and_classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass, two heads: (unit-norm embeddings, logits)."""
        features = self.features(images)
        return F.normalize(features, dim=1), self.head(features)


@dataclass
class Artifact:
    model: ListingModel
    card: dict
    preprocessing: Preprocessing

    @property
    def categories(self) -> list[str]:
        return list(self.card["categories"])

    @property
    def version(self) -> str:
        return str(self.card["model_version"])


def save_artifact(directory: Path, model: ListingModel, categories: list[str], **card_fields) -> dict:
    """Write weights, labels and model card; the model version is derived from the weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; containers read it as another user
    weights_sha = sha256_file(directory / WEIGHTS_FILE)
    backbone = get_backbone(model.backbone_name)
    card = {
        "format_version": FORMAT_VERSION,
        "backbone": backbone.name,
        "input_size": backbone.preprocessing.input_size,
        "preprocessing": backbone.preprocessing.to_dict(),
        "embedding_dim": backbone.embedding_dim,
        "num_classes": len(categories),
        "categories": list(categories),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": weights_sha,
        "model_version": f"{backbone.name}-{weights_sha[:12]}",
        **card_fields,
    }
    (directory / LABELS_FILE).write_text(json.dumps({"version": 1, "categories": list(categories)}, indent=2))
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    return card


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing; export a model with `python -m training.train` "
            "or point the embedder at an artefact directory"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None


def load_artifact(directory: Path, *, verify_checksum: bool = True) -> Artifact:
    """Load and cross-check an artefact; raise ArtifactError naming the problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artefact directory {directory} does not exist")
    card = _read_json(directory / CARD_FILE)
    labels = _read_json(directory / LABELS_FILE)
    for key in ("backbone", "categories", "embedding_dim", "preprocessing", "model_version"):
        if key not in card:
            raise ArtifactError(f"{directory / CARD_FILE} lacks '{key}'")
    if labels.get("categories") != card["categories"]:
        raise ArtifactError(f"{directory / LABELS_FILE} and {CARD_FILE} disagree on the categories")
    try:
        backbone = get_backbone(card["backbone"])
    except KeyError as exc:
        raise ArtifactError(str(exc)) from None
    if backbone.embedding_dim != int(card["embedding_dim"]):
        raise ArtifactError(
            f"model card says embedding_dim {card['embedding_dim']}, backbone "
            f"{backbone.name} produces {backbone.embedding_dim}"
        )
    weights = directory / card.get("weights_file", WEIGHTS_FILE)
    if not weights.is_file():
        raise ArtifactError(f"weights file {weights} is missing")
    if verify_checksum and card.get("weights_sha256") and sha256_file(weights) != card["weights_sha256"]:
        raise ArtifactError(f"{weights} does not match the checksum in {CARD_FILE}")
    model = ListingModel(backbone, len(card["categories"]), pretrained=False)
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # safetensors raises its own error type for a non-safetensors file
        raise ArtifactError(
            f"cannot load {weights}: not a safetensors file that fits backbone {backbone.name} with "
            f"{len(card['categories'])} categories: {exc}"
        ) from None
    model.eval()
    return Artifact(model, card, Preprocessing.from_dict(card["preprocessing"]))


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every eval-mode batch norm into the convolution right before it, in place; return
    how many were folded.

    A frozen BN is a per-channel affine map, so ``conv -> bn`` equals one conv with scaled
    weights and a bias: one pass over the activations less per layer, about 1.5x faster on a CPU
    for EfficientNet-Lite. timm's ``BatchNormAct2d`` also holds the activation; that is kept in
    the BN's place. Pairs are found by child order (conv then its BN, as timm and torchvision
    declare them), so the caller must check the folded model still computes the same thing.
    """
    folded = 0
    previous: tuple[str, nn.Module] | None = None
    for name, child in list(module.named_children()):
        if (
            isinstance(child, nn.BatchNorm2d)
            and previous is not None
            and isinstance(previous[1], nn.Conv2d)
            and child.track_running_stats
        ):
            setattr(module, previous[0], fuse_conv_bn_eval(previous[1], child))
            after = nn.Sequential(getattr(child, "drop", nn.Identity()), getattr(child, "act", nn.Identity()))
            setattr(module, name, after)
            folded += 1
            child = after
        else:
            folded += fold_batch_norms(child)
        previous = (name, child)
    return folded


def fold_batch_norms_measured(
    module: nn.Module, run: Callable[[torch.Tensor], object], input_size: int
) -> tuple[int, float]:
    """Fold ``module``'s batch norms in place (``fold_batch_norms``) and return how many it
    folded and the largest change this made to ``run``'s output (a tensor or a tuple of them)
    on a seeded random batch: the check every caller must make, since pairs are found by order."""
    probe = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # not inference_mode: the folded weights must stay normal tensors
        before = run(probe)
        folded = fold_batch_norms(module)
        after = run(probe)
    if isinstance(before, torch.Tensor):
        before, after = (before,), (after,)
    return folded, max(float((b - a).abs().max()) for b, a in zip(before, after))


# --------------------------------------------------------------------------- runtime files
#
# The artefact also carries the model for the ONNX runtimes (`common.runtimes`), versioned with
# the weights it was exported from:
#
#     model.onnx        the ListingModel as ONNX: images (B, 3, H, W) float32 -> embeddings
#                       (B, D, unit norm), logits (B, C); dynamic batch size
#     model.int8.onnx   the same, quantised to int8 (QDQ) with a calibration set of training photos
#     check_photos/     the real photos every runtime is compared with torch on at load
#
# and the model card says how: ``card["runtimes"]`` (files, checksums, opset, the versions of
# torch / onnx / onnxruntime / openvino at export, the calibration set).

#: Check photos copied into an artefact: enough to see a bad kernel or a lossy precision, few
#: enough that comparing every runtime with torch at load takes a second or two.
CHECK_PHOTO_COUNT = 16
#: Training photos the int8 quantisation calibrates its activation ranges on: every category
#: many times over, so the ranges are the catalogue's and not a few photos' (64 were too few).
CALIBRATION_PHOTO_COUNT = 300
ONNX_INPUT = "images"
ONNX_OUTPUTS = ("embeddings", "logits")


class EmbedAndClassify(nn.Module):
    """``ListingModel.embed_and_classify`` as a module's forward, the graph ONNX export traces."""

    def __init__(self, model: ListingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.embed_and_classify(images)


def export_onnx(
    module: nn.Module, input_size: int, path: Path, output_names: tuple[str, ...] = ONNX_OUTPUTS
) -> dict:
    """Export ``module`` (images -> outputs) to ONNX at ``path`` with a dynamic batch size; the
    module's train/eval mode is left as it was. Returns what the model card records."""
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    sample = torch.zeros(1, 3, input_size, input_size)
    dynamic = {name: {0: "batch"} for name in (ONNX_INPUT, *output_names)}
    tmp = path.with_suffix(".tmp.onnx")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            # The TorchScript exporter: a plain static graph of the traced network, readable by
            # every runtime we pin, and no dependency on onnxscript.
            torch.onnx.export(
                module,
                (sample,),
                str(tmp),
                dynamo=False,
                opset_version=_opset(),
                input_names=[ONNX_INPUT],
                output_names=list(output_names),
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        module.train(was_training)
    path.chmod(0o644)
    from common.runtimes import runtime_versions

    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "opset": _opset(),
        "input": ONNX_INPUT,
        "outputs": list(output_names),
        "dynamic_batch": True,
        "exported_with": runtime_versions(),
    }


def _opset() -> int:
    from common.runtimes import ONNX_OPSET

    return ONNX_OPSET


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> dict:
    """Post-training static int8 quantisation of an exported model with ONNX Runtime's quantiser
    (QDQ format: per-channel symmetric weights, symmetric int8 activations with ranges from
    ``calibration``, a float32 batch of preprocessed training photos; the embedding and the head
    stay float, ``float_tail``). ONNX Runtime and OpenVINO both run the result. Returns what
    the model card records.

    Weights use 7 of their 8 bits (``reduce_range``): CPUs without VNNI (AVX2, AVX-512 without
    VNNI) multiply int8 with ``vpmaddubsw``, whose 16-bit sums of two 8-bit products saturate
    with full-range weights. Measured on EfficientNet-Lite0 against torch, 67 validation photos,
    this AVX2 CPU: full-range weights and asymmetric activations gave min / mean embedding
    cosine 0.62 / 0.86 (ONNX Runtime) and 0.73 / 0.91 (OpenVINO); 7-bit weights with symmetric
    activations 0.89 / 0.97 in both."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self._rows = iter(range(0, len(calibration), 8))

        def get_next(self):
            start = next(self._rows, None)
            if start is None:
                return None
            return {ONNX_INPUT: np.ascontiguousarray(calibration[start : start + 8], np.float32)}

    int8_path = Path(int8_path)
    prepared = int8_path.with_suffix(".prep.onnx")
    kept_float = float_tail(fp32_path)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs a line per adjusted channel on the root logger
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_path),
            Photos(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=kept_float,
            reduce_range=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)
    int8_path.chmod(0o644)
    return {
        "file": int8_path.name,
        "sha256": sha256_file(int8_path),
        "calibration_photos": int(len(calibration)),
        "method": "onnxruntime quantize_static, QDQ, per-channel symmetric 7-bit weights, "
        "MinMax calibrated symmetric int8 activations, pooling, embedding and "
        "head in float32",
        "float_nodes": kept_float,
    }


def preprocess_files(files: list[Path], preprocessing: Preprocessing) -> np.ndarray:
    """Photo files -> the model's float32 input batch (N, 3, H, W), decoded and transformed as
    the embedder does it for a request (``open_image``: upright RGB; the evaluation transform)."""
    from common.images import open_image

    transform = preprocessing.transform()
    return torch.stack([transform(open_image(Path(path).read_bytes())) for path in files]).numpy()


def float_tail(model_path: Path) -> list[str]:
    """The graph's nodes from the global pooling on: the embedding itself (pooled features, then
    its L2 normalisation) and the category head. They stay float32 in the int8 model: they cost
    little, and the embedding is what is compared, so it should not be rounded to an int8 grid
    on top of the backbone's own quantisation error."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tail: dict[str, None] = {}
    todo = [node for node in graph.node if node.op_type in ("GlobalAveragePool", "ReduceMean")]
    while todo:
        node = todo.pop()
        if node.name in tail:
            continue
        tail[node.name] = None
        for output in node.output:
            todo.extend(consumers.get(output, []))
    return list(tail)


def add_runtime_files(
    directory: Path,
    *,
    check_photos: list[Path],
    calibration_photos: list[Path] = (),
    model: ListingModel | None = None,
) -> dict:
    """Write ``model.onnx`` (and ``model.int8.onnx`` when calibration photos are given) and the
    check photos into an artefact directory, and record them in its model card; returns the card.

    ``model`` is the artefact's model when the caller has it in memory (training), else it is
    loaded from the directory.
    """
    import shutil

    directory = Path(directory)
    card = _read_json(directory / CARD_FILE)
    if model is None:
        model = load_artifact(directory).model
    side = int(card.get("input_size") or Preprocessing.from_dict(card["preprocessing"]).input_size)
    runtimes: dict = {"model_version": card["model_version"]}
    runtimes["onnx"] = export_onnx(EmbedAndClassify(model), side, directory / ONNX_FILE)
    check_dir = directory / CHECK_PHOTOS_DIR
    if check_dir.exists():
        shutil.rmtree(check_dir)
    check_dir.mkdir()
    names = []
    for path in list(check_photos)[:CHECK_PHOTO_COUNT]:
        shutil.copyfile(path, check_dir / Path(path).name)
        (check_dir / Path(path).name).chmod(0o644)
        names.append(Path(path).name)
    runtimes["check_photos"] = names
    (directory / ONNX_INT8_FILE).unlink(missing_ok=True)
    if calibration_photos:
        calibration = preprocess_files(
            list(calibration_photos)[:CALIBRATION_PHOTO_COUNT], Preprocessing.from_dict(card["preprocessing"])
        )
        runtimes["int8"] = quantize_int8(directory / ONNX_FILE, directory / ONNX_INT8_FILE, calibration)
    card["runtimes"] = runtimes
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    return card


def runtime_model_file(directory: Path, card: dict, precision: str) -> Path | None:
    """The artefact's ONNX model for ``precision`` (int8: the quantised one, else the float one)
    if it is there, was exported from these weights and is intact; None otherwise."""
    runtimes = card.get("runtimes") or {}
    entry = runtimes.get("int8" if precision == "int8" else "onnx")
    if not entry or runtimes.get("model_version") != card.get("model_version"):
        return None
    path = Path(directory) / entry["file"]
    if not path.is_file() or sha256_file(path) != entry.get("sha256"):
        return None
    return path


def check_photo_files(directory: Path) -> list[Path]:
    """The artefact's check photos, in a fixed order ([] when it has none)."""
    folder = Path(directory) / CHECK_PHOTOS_DIR
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
