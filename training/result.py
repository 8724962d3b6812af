"""What a training run produces, shared by `training.train` (which makes it) and `training.export`
(which writes it), so neither imports the other's internals."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from common.model import ListingModel
from training.config import TrainConfig


@dataclass
class TrainResult:
    model: ListingModel
    config: TrainConfig
    #: one entry per epoch, then ``{"best_epoch": n}`` when a valid split chose the epoch.
    history: list[dict]
    #: pooled features / embeddings / logits of every training photo (`TrainingPhotos` order).
    features: np.ndarray
    embeddings: np.ndarray
    logits: np.ndarray
    timings: dict


@dataclass(frozen=True)
class Headline:
    """The headline numbers of a run (test split unless named otherwise): the model card's
    ``metrics`` and ``metrics.json``'s ``summary``."""

    image_top1: float | None = None
    image_top3: float | None = None
    listing_top1: float | None = None
    listing_top3: float | None = None
    valid_image_top1: float | None = None
    precision_at_10: float | None = None
    same_listing_recall_at_1: float | None = None
    same_listing_recall_at_5: float | None = None

    @classmethod
    def from_metrics(cls, metrics: dict) -> Headline:
        """Pick the headline out of `training.train.evaluate_result`'s metrics."""
        test = metrics.get("test", {})
        retrieval = metrics.get("retrieval", {})
        return cls(
            image_top1=test.get("image_top1"),
            image_top3=test.get("image_top3"),
            listing_top1=test.get("listing_top1"),
            listing_top3=test.get("listing_top3"),
            valid_image_top1=metrics.get("valid", {}).get("image_top1"),
            precision_at_10=retrieval.get("precision_at_10"),
            same_listing_recall_at_1=retrieval.get("same_listing_recall_at_1"),
            same_listing_recall_at_5=retrieval.get("same_listing_recall_at_5"),
        )

    def to_json(self) -> dict:
        return asdict(self)
