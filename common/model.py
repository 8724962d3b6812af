"""The listing model (backbone + category head) and its exported artefact directory.

Training writes an artefact with ``save_artifact``; the embedder loads it with ``load_artifact``.
Weights are stored as safetensors and everything else as JSON, so loading an artefact never
unpickles anything.

Artefact layout::

    model_card.json   backbone, preprocessing, embedding_dim, categories, version, metrics, ...
    model.safetensors ListingModel state dict
    labels.json       {"version": 1, "categories": [...]} (label i = categories[i])
    embeddings/       image_embeddings.npy + image_ids.json (+ image_embeddings.json, seed format)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from common.backbones import Backbone, Preprocessing, get_backbone

#: Largest difference folding batch norms may make to an embedding or a probability; float32
#: rounding makes about 1e-6, a wrongly folded layer makes O(1).
FOLD_TOLERANCE = 1e-3

CARD_FILE = "model_card.json"
WEIGHTS_FILE = "model.safetensors"
LABELS_FILE = "labels.json"
FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """An artefact directory is missing, incomplete or inconsistent; the message says how."""


class ListingModel(nn.Module):
    """Backbone features (the embedding) followed by a linear head over the main categories."""

    def __init__(self, backbone: Backbone, num_classes: int, *, pretrained: bool = True,
                 dropout: float = 0.2) -> None:
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_artifact(directory: Path, model: ListingModel, categories: list[str], **card_fields) -> dict:
    """Write weights, labels and model card; the model version is derived from the weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; containers read it as another user
    weights_sha = file_sha256(directory / WEIGHTS_FILE)
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
    (directory / LABELS_FILE).write_text(json.dumps({"version": 1, "categories": list(categories)},
                                                    indent=2))
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    return card


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; export a model with `python -m training.train` "
                            "or point the embedder at an artefact directory")
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
        raise ArtifactError(f"model card says embedding_dim {card['embedding_dim']}, backbone "
                            f"{backbone.name} produces {backbone.embedding_dim}")
    weights = directory / card.get("weights_file", WEIGHTS_FILE)
    if not weights.is_file():
        raise ArtifactError(f"weights file {weights} is missing")
    if verify_checksum and card.get("weights_sha256") and file_sha256(weights) != card["weights_sha256"]:
        raise ArtifactError(f"{weights} does not match the checksum in {CARD_FILE}")
    model = ListingModel(backbone, len(card["categories"]), pretrained=False)
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # safetensors raises its own error type for a non-safetensors file
        raise ArtifactError(f"cannot load {weights}: not a safetensors file that fits backbone {backbone.name} with "
                            f"{len(card['categories'])} categories: {exc}") from None
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
        if (isinstance(child, nn.BatchNorm2d) and previous is not None
                and isinstance(previous[1], nn.Conv2d) and child.track_running_stats):
            setattr(module, previous[0], fuse_conv_bn_eval(previous[1], child))
            after = nn.Sequential(getattr(child, "drop", nn.Identity()),
                                  getattr(child, "act", nn.Identity()))
            setattr(module, name, after)
            folded += 1
            child = after
        else:
            folded += fold_batch_norms(child)
        previous = (name, child)
    return folded


def fold_batch_norms_measured(module: nn.Module, run: Callable[[torch.Tensor], object],
                              input_size: int) -> tuple[int, float]:
    """Fold ``module``'s batch norms in place (``fold_batch_norms``) and return how many it
    folded and the largest change this made to ``run``'s output (a tensor or a tuple of them)
    on a seeded random batch: the check every caller must make, since pairs are found by order."""
    probe = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():   # not inference_mode: the folded weights must stay normal tensors
        before = run(probe)
        folded = fold_batch_norms(module)
        after = run(probe)
    if isinstance(before, torch.Tensor):
        before, after = (before,), (after,)
    return folded, max(float((b - a).abs().max()) for b, a in zip(before, after))
