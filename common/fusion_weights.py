"""The gateway's default fusion weights, chosen on the valid split for one image model.

``fusion_weights.json`` sits in the artefact beside the text heads. It holds the text weight ``w``
of the two weighted-cosine fusions the gateway applies when a caller does not choose one:

* ``search_text_weight``: hybrid Search (a photo and a text query), ``(1 - w) * photo cosine +
  w * text cosine``;
* ``similar_text_weight``: SimilarListings (a listing's photos and its text).

Both are picked on the valid split over a grid (`training.fusion_weights`, run by
``training.text``), for the image model named in the file: photo cosines change with the image
model, so a file chosen for another model version is refused at load (`FusionWeightsError`, the
message names the command that refits it), exactly as a stale text head is (`common.text.TextHead`).

JSON only; this module imports neither torch nor gRPC. The embedder reads the file (it owns the
artefact) and reports it in GetModelInfo; the gateway takes its defaults from there.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.artifact import CARD_FILE, FUSION_WEIGHTS_FILE

FUSION_WEIGHTS_FORMAT_VERSION = 1


class FusionWeightsError(RuntimeError):
    """``fusion_weights.json`` is missing, malformed or chosen for another image model; the
    message says what to run."""


class FusionWeightsMissing(FusionWeightsError):
    """The artefact has no ``fusion_weights.json`` (e.g. it has no text heads either)."""


def refit_command(artifact_dir: Path | str | None = None) -> str:
    """The command that chooses the fusion weights of an artefact again."""
    artifact = artifact_dir if artifact_dir is not None else "DIR"
    return f"python -m training.fusion_weights --data build/data --artifact {artifact}"


@dataclass(frozen=True)
class FusionWeights:
    """Text weights in [0, 1] of hybrid Search and SimilarListings, and how they were chosen."""

    search_text_weight: float
    similar_text_weight: float
    image_model_version: str
    text_model: str = ""
    chosen_on: str = "valid"
    #: What each weight maximised, e.g. {"search": "same-category precision@10 of ...", ...}.
    measures: dict = field(default_factory=dict)
    #: {"search": {"0.0": p, ...}, "similar": {...}}: the valid curves the choice was read from.
    valid_curves: dict = field(default_factory=dict)
    valid_queries: int = 0

    def __post_init__(self) -> None:
        for name in ("search_text_weight", "similar_text_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise FusionWeightsError(f"{name} must be a number in [0, 1], got {value!r}")
        if not self.image_model_version:
            raise FusionWeightsError(
                "image_model_version is empty: the weights must name the image model they were chosen for"
            )

    def check_image_model(self, model_version: str, artifact_dir: Path | str | None = None) -> None:
        """Raise FusionWeightsError unless these weights were chosen for ``model_version``."""
        if self.image_model_version != model_version:
            raise FusionWeightsError(
                f"the fusion weights in {FUSION_WEIGHTS_FILE} were chosen for image model "
                f"{self.image_model_version}, but the image model is now {model_version}; choose "
                f"them again with `{refit_command(artifact_dir)}` (training.text and "
                "training.train do it when they refit the text heads)"
            )

    def save(self, directory: Path | str) -> Path:
        """Write ``fusion_weights.json`` into ``directory`` (atomically); returns its path."""
        path = Path(directory) / FUSION_WEIGHTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format_version": FUSION_WEIGHTS_FORMAT_VERSION, **asdict(self)}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: Path | str, *, image_model_version: str | None = None) -> "FusionWeights":
        """The weights in ``directory``; refused (`FusionWeightsError`) when missing, malformed, or
        chosen for another image model than ``image_model_version`` (default: the
        ``model_card.json`` beside them, when there is one)."""
        directory = Path(directory)
        path = directory / FUSION_WEIGHTS_FILE
        if not path.is_file():
            raise FusionWeightsMissing(
                f"{path} is missing; choose the fusion weights with `{refit_command(directory)}`"
            )
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
            raise FusionWeightsError(f"cannot read {path}: {exc}") from None
        if not isinstance(payload, dict) or payload.get("format_version") != FUSION_WEIGHTS_FORMAT_VERSION:
            version = payload.get("format_version") if isinstance(payload, dict) else None
            raise FusionWeightsError(
                f"{path} has format_version {version!r}, expected "
                f"{FUSION_WEIGHTS_FORMAT_VERSION}; run `{refit_command(directory)}`"
            )
        payload.pop("format_version")
        known = set(cls.__dataclass_fields__)
        try:
            weights = cls(**{k: v for k, v in payload.items() if k in known})
        except TypeError as exc:  # a required field is missing
            raise FusionWeightsError(f"{path} is incomplete: {exc}") from None
        if image_model_version is None and (directory / CARD_FILE).is_file():
            try:
                card = json.loads((directory / CARD_FILE).read_text())
            except (json.JSONDecodeError, OSError) as exc:
                raise FusionWeightsError(f"cannot read the image model card beside {path}: {exc}") from None
            image_model_version = card.get("model_version")
        if image_model_version is not None:
            weights.check_image_model(str(image_model_version), directory)
        return weights
