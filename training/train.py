"""Train the listing model on the prepared data, evaluate it honestly and export an artefact.

    python -m training.train --preset probe --data build/data --out artifacts/lite0-probe
    python -m training.train --preset lite2-probe            # presets: see training.config.PRESETS
    python -m training.train --preset finetune --set unfrozen_blocks=3 --set epochs=6
    python -m training.train --config my.json --out artifacts/mine   # TrainConfig keys as JSON
    python -m training.search --data build/data                  # small hyper-parameter search

Everything that costs backbone passes is cached under ``build/cache/features`` (keyed by photo bytes,
backbone and view), and an artefact directory remembers the data fingerprint and configuration that
made it: re-running with unchanged inputs prints "up to date" and trains nothing (``--force`` retrains).

Model selection uses the valid split only; the test split is looked at once, for the reported metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common.artifact import CARD_FILE, FUSION_WEIGHTS_FILE, TEXT_CARD_FILE, artifact_complete
from common.backbones import get_backbone
from training.settings import TORCH_THREADS
from common.model import ListingModel
from training.config import PRESETS, TrainConfig, load_config, parse_override, preset
from training.dataset import DEFAULT_OUT_DIR, TrainingPhotos, load_training_photos
from training.evaluate import DEFINITIONS, classification_metrics, retrieval_metrics, softmax
from training.export import export_artifact, write_runtime_files
from training.features import DEFAULT_CACHE_DIR, FeatureExtractor, TrainableSuffix, backbone_blocks, cut_for
from training.result import TrainResult

log = logging.getLogger("training")

#: Bump when a change in this code changes what a given config trains (invalidates artefacts).
TRAINER_VERSION = 1


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads() -> None:
    """Threads for the convolution passes: env TORCH_THREADS, else every core (at most 8)."""
    threads = TORCH_THREADS.from_environment() or min(os.cpu_count() or 1, 8)
    torch.set_num_threads(threads)


@contextmanager
def single_thread():
    """Small matrix products (a linear head, a projection) run many times faster on one thread than
    on two when the cores are shared: the threads otherwise spin waiting for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(
        total=total,
        desc=desc,
        unit="img",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=2.0,
        leave=False,
    )


def _schedule(optimiser, config: TrainConfig, steps: int):
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimiser, lambda _: 1.0)
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )


def _optimiser(groups: list[dict], config: TrainConfig):
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _freeze_bn(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


# --------------------------------------------------------------------------- the epoch loop


@dataclass
class EpochSteps:
    """What one way of training does in an epoch; `run_epochs` does the rest.

    ``begin()`` puts the trained modules in train mode and returns the epoch's order of train rows
    (drawing the epoch's randomness); ``logits(rows, start)`` are the train-mode logits of one batch
    (``start``: its offset in that order); ``end()`` runs after the last batch; ``valid_logits()``
    are the logits of the valid rows (None: no valid split, the last epoch is kept).
    """

    begin: Callable[[], Any]
    logits: Callable[[Any, int], torch.Tensor]
    valid_logits: Callable[[], torch.Tensor] | None = None
    end: Callable[[], None] = lambda: None


def run_epochs(
    steps: EpochSteps,
    *,
    kept: nn.Module,
    labels: torch.Tensor,
    valid_labels: torch.Tensor,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    name: str,
    progress: bool = True,
    log_level: int = logging.INFO,
) -> list[dict]:
    """The one training loop: each epoch shuffles (`EpochSteps.begin`), runs the batches (loss
    with the config's label smoothing, an optimiser and a scheduler step per batch), scores the
    valid split, and keeps the state of ``kept`` from the epoch with the best valid accuracy (then
    the lowest valid loss), loaded back at the end. ``labels`` are the label of each train row,
    ``valid_labels`` of each valid row. Returns the per-epoch history (and the best epoch)."""
    history, best = [], None
    for epoch in range(config.epochs):
        order = steps.begin()
        total_loss, correct, seen = 0.0, 0, 0
        bar = _progress(len(order), f"{name} epoch {epoch + 1}/{config.epochs}", progress)
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            logits = steps.logits(rows, start)
            loss = F.cross_entropy(logits, labels[rows], label_smoothing=config.label_smoothing)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(rows)
            correct += int((logits.argmax(1) == labels[rows]).sum())
            seen += len(rows)
            bar.update(len(rows))
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        bar.close()
        steps.end()
        entry = {"epoch": epoch + 1, "train_loss": total_loss / seen, "train_acc": correct / seen}
        if steps.valid_logits is not None:
            logits = steps.valid_logits()
            entry["valid_loss"] = float(F.cross_entropy(logits, valid_labels))
            entry["valid_acc"] = float((logits.argmax(1) == valid_labels).float().mean())
            if best is None or (entry["valid_acc"], -entry["valid_loss"]) > best[0]:
                best = (
                    (entry["valid_acc"], -entry["valid_loss"]),
                    {k: v.detach().clone() for k, v in kept.state_dict().items()},
                    epoch + 1,
                )
        history.append(entry)
        log.log(
            log_level,
            "%s epoch %d/%d  train loss %.3f acc %.3f  valid loss %s acc %s",
            name,
            epoch + 1,
            config.epochs,
            entry["train_loss"],
            entry["train_acc"],
            _fmt(entry.get("valid_loss")),
            _fmt(entry.get("valid_acc")),
        )
    if best is not None:
        kept.load_state_dict(best[1])
        history.append({"best_epoch": best[2]})
    return history


# --------------------------------------------------------------------------- the head (probe)


def train_head(
    head: nn.Linear,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    config: TrainConfig,
    *,
    progress: bool = True,
) -> list[dict]:
    """Train a linear head on fixed features; keep the epoch with the best valid accuracy.

    `x_train` may hold several views of each train photo (rows repeated with their label).
    Returns the per-epoch history.
    """
    generator = torch.Generator().manual_seed(config.seed)
    xt = torch.as_tensor(x_train, dtype=torch.float32)
    yt = torch.as_tensor(y_train)
    xv = torch.as_tensor(x_valid, dtype=torch.float32)
    yv = torch.as_tensor(y_valid)
    dropout = nn.Dropout(config.dropout)
    steps_per_epoch = max(1, math.ceil(len(xt) / config.batch_size))
    optimiser = (
        torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        if config.optimizer == "adamw"
        else _optimiser([{"params": head.parameters()}], config)
    )
    scheduler = _schedule(optimiser, config, config.epochs * steps_per_epoch)

    def begin() -> torch.Tensor:
        head.train()
        return torch.randperm(len(xt), generator=generator)

    def valid_logits() -> torch.Tensor:
        with torch.no_grad():
            return head(xv)

    steps = EpochSteps(
        begin,
        lambda rows, _start: head(dropout(xt[rows])),
        valid_logits if len(xv) else None,
        end=head.eval,
    )
    return run_epochs(
        steps,
        kept=head,
        labels=yt,
        valid_labels=yv,
        optimiser=optimiser,
        scheduler=scheduler,
        config=config,
        name="head",
        progress=progress,
        log_level=logging.DEBUG,  # many quick epochs
    )


# --------------------------------------------------------------------------- fine-tuning


class CachedViews:
    """Activations at the frozen cut for every photo and view, in memory (float16)."""

    def __init__(self, views: dict[str, np.ndarray]):
        self.views = views  # view -> (N, C, H, W) float16

    def batch(self, rows: np.ndarray, view_of_row: list[str]) -> torch.Tensor:
        arrays = [self.views[v][r] for r, v in zip(rows, view_of_row)]
        return torch.from_numpy(np.stack(arrays)).float().contiguous(memory_format=torch.channels_last)


def cache_cut(features: nn.Module, backbone_name: str, cut: int) -> int:
    """Where to cache activations for a given trainable cut: the end of the last stride-16 stage or
    `cut` when it is earlier, so different numbers of unfrozen blocks share one cache."""
    blocks = backbone_blocks(features)
    if hasattr(features, "blocks"):  # EfficientNet: stages 0-4 end at stride 16
        boundary = sum(len(stage) for stage in list(features.blocks)[:5])
    else:  # ResNet: layer1-3
        boundary = len(features.layer1) + len(features.layer2) + len(features.layer3)
    return min(cut, boundary, len(blocks))


@torch.inference_mode()
def _advance(
    features: nn.Module, activations: np.ndarray, start: int, stop: int, batch: int = 128
) -> np.ndarray:
    """Run frozen blocks ``start..stop`` over cached activations (float16 in and out)."""
    if start == stop:
        return activations
    blocks = nn.Sequential(*backbone_blocks(features)[start:stop]).eval()
    out = [
        blocks(
            torch.from_numpy(activations[i : i + batch]).float().contiguous(memory_format=torch.channels_last)
        )
        .to(torch.float16)
        .numpy()
        for i in range(0, len(activations), batch)
    ]
    return np.concatenate(out)


def finetune_cached(
    model: ListingModel,
    cut: int,
    views: CachedViews,
    train_rows: np.ndarray,
    train_views: list[str],
    labels: np.ndarray,
    valid_rows: np.ndarray,
    config: TrainConfig,
    *,
    progress: bool = True,
) -> list[dict]:
    """Train blocks ``cut..`` + head conv + linear head on cached activations; keep the best epoch
    on the valid split (centre view)."""
    generator = np.random.default_rng(config.seed)
    suffix = TrainableSuffix(model.features, cut)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(suffix.parameters())
    for p in trainable + list(model.head.parameters()):
        p.requires_grad_(True)
    optimiser = _optimiser(
        [
            {"params": trainable, "lr": config.lr},
            {"params": list(model.head.parameters()), "lr": config.lr * config.head_lr_mult},
        ],
        config,
    )
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    scheduler = _schedule(optimiser, config, config.epochs * steps_per_epoch)
    y = torch.tensor(np.asarray(labels))
    chosen = np.zeros(0, dtype=int)  # the epoch's view of each train row, in the epoch's order

    def begin() -> np.ndarray:
        nonlocal chosen
        suffix.train()
        if config.freeze_bn:
            _freeze_bn(suffix)
        model.dropout.train()
        order = generator.permutation(train_rows)
        chosen = generator.integers(len(train_views), size=len(order))
        return order

    def logits(rows: np.ndarray, start: int) -> torch.Tensor:
        x = views.batch(rows, [train_views[c] for c in chosen[start : start + len(rows)]])
        return model.head(model.dropout(suffix(x)))

    steps = EpochSteps(
        begin,
        logits,
        (lambda: cached_logits(model, suffix, views, valid_rows, "center")[1]) if len(valid_rows) else None,
    )
    history = run_epochs(
        steps,
        kept=model,
        labels=y,
        valid_labels=y[valid_rows],
        optimiser=optimiser,
        scheduler=scheduler,
        config=config,
        name="finetune",
        progress=progress,
    )
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history


@torch.no_grad()
def cached_logits(
    model: ListingModel,
    suffix: TrainableSuffix,
    views: CachedViews,
    rows: np.ndarray,
    view: str,
    batch: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, logits) of `rows` computed from cached activations, in eval mode."""
    was_training = suffix.training
    suffix.eval()
    feats = []
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        feats.append(suffix(views.batch(part, [view] * len(part))))
    suffix.train(was_training)
    features = torch.cat(feats) if feats else torch.zeros(0, model.head.in_features)
    return features, model.head(features)


def finetune_end_to_end(
    model: ListingModel,
    photos: TrainingPhotos,
    train_rows: np.ndarray,
    valid_rows: np.ndarray,
    config: TrainConfig,
    *,
    progress: bool = True,
) -> list[dict]:
    """The baseline project's way: every epoch decodes and augments every train photo afresh."""
    from PIL import Image

    backbone = get_backbone(config.backbone)
    augment = backbone.preprocessing.train_transform()
    evaluate = backbone.preprocessing.transform()
    files = photos.files
    labels = torch.as_tensor(photos.labels)
    model.to(memory_format=torch.channels_last)
    head_params = set(map(id, model.head.parameters()))
    optimiser = _optimiser(
        [
            {"params": [p for p in model.parameters() if id(p) not in head_params], "lr": config.lr},
            {"params": list(model.head.parameters()), "lr": config.lr * config.head_lr_mult},
        ],
        config,
    )
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    scheduler = _schedule(optimiser, config, config.epochs * steps_per_epoch)
    generator = np.random.default_rng(config.seed)

    def load(rows, transform):
        tensors = []
        for r in rows:
            with Image.open(files[r]) as img:
                tensors.append(transform(img.convert("RGB")))
        return torch.stack(tensors).contiguous(memory_format=torch.channels_last)

    def begin() -> np.ndarray:
        model.train()
        if config.freeze_bn:
            _freeze_bn(model)
        return generator.permutation(train_rows)

    def valid_logits() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [model(load(valid_rows[i : i + 64], evaluate)) for i in range(0, len(valid_rows), 64)]
            )

    steps = EpochSteps(
        begin,
        lambda rows, _start: model(load(rows, augment)),
        valid_logits if len(valid_rows) else None,
        end=model.eval,
    )
    history = run_epochs(
        steps,
        kept=model,
        labels=labels,
        valid_labels=labels[valid_rows],
        optimiser=optimiser,
        scheduler=scheduler,
        config=config,
        name="end to end",
        progress=progress,
    )
    model.eval()
    return history


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------- the training modes


def _train_views(config: TrainConfig) -> list[str]:
    views = ["center"] + (["flip"] if config.flip_views else [])
    return views + [f"aug{k}" for k in range(config.aug_views if config.mode == "finetune" else 0)]


@dataclass
class TrainingRun:
    """What every mode works from: the model, the photos and their cached backbone outputs."""

    config: TrainConfig
    model: ListingModel
    photos: TrainingPhotos
    backbone_name: str
    train_rows: np.ndarray
    valid_rows: np.ndarray
    #: output name -> array for every photo's centre view.
    center: dict[str, np.ndarray]
    #: view -> output name -> array for the train photos' extra views (train_rows order).
    extra: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    progress: bool = True


class TrainingMode:
    """One way of training (`training_mode` picks it from the config). `fit` runs the shared steps
    (cached backbone passes, the linear head, the final outputs) and asks the mode at each."""

    def __init__(self, config: TrainConfig, model: ListingModel) -> None:
        self.config = config
        self.model = model

    def cached_outputs(self) -> tuple[str, ...]:
        """What the feature cache must hold for every photo."""
        return ("pooled",)

    def extra_views(self) -> list[str]:
        """The train photos' views besides the centre one that the cache must hold."""
        return _train_views(self.config)[1:]

    @property
    def fits_probe_head(self) -> bool:
        """Whether the linear head is first fit on frozen features (LP-FT's first step)."""
        return self.config.init_head_from_probe

    def probe_config(self) -> TrainConfig:
        return self.config.with_overrides(
            **PRESETS["probe"]
            | {
                "name": self.config.name,
                "backbone": self.config.backbone,
                "seed": self.config.seed,
                "fit_on": self.config.fit_on,
            }
        )

    def train(self, run: TrainingRun, head_history: list[dict]) -> list[dict]:
        """Train the model after the head step; return the history the artefact keeps."""
        if head_history:
            log.info(
                "probe head: valid acc %s",
                _fmt(max((h.get("valid_acc", 0) for h in head_history), default=None)),
            )
        return self._train(run)

    def _train(self, run: TrainingRun) -> list[dict]:
        raise NotImplementedError

    def final_features(self, run: TrainingRun, *, exact_outputs: bool) -> np.ndarray:
        """Pooled features of every photo from the final model: one fresh pass of the exported model."""
        files, keys = run.photos.files, run.photos.keys
        backbone = get_backbone(run.backbone_name)
        return FeatureExtractor(
            backbone, cache_dir=None, progress=run.progress, features=self.model.features
        ).get(files, keys, "center", ("pooled",), desc="final model, all photos")["pooled"]


class LinearProbe(TrainingMode):
    """A linear head on the frozen backbone's pooled features (centre and flipped views)."""

    def extra_views(self) -> list[str]:
        return [view for view in super().extra_views() if view == "flip"]

    @property
    def fits_probe_head(self) -> bool:
        return True

    def probe_config(self) -> TrainConfig:
        return self.config

    def train(self, run: TrainingRun, head_history: list[dict]) -> list[dict]:
        return head_history

    def final_features(self, run: TrainingRun, *, exact_outputs: bool) -> np.ndarray:
        return run.center["pooled"]  # exactly the frozen backbone's output


class CachedFinetune(TrainingMode):
    """The last `unfrozen_blocks` blocks, the head conv and the head trained on activations cached
    at the frozen cut (float16), so an epoch costs no pass through the frozen blocks."""

    def __init__(self, config: TrainConfig, model: ListingModel) -> None:
        super().__init__(config, model)
        self.cut = cut_for(model.features, int(config.unfrozen_blocks))
        self.base_cut = cache_cut(model.features, config.backbone, self.cut)
        self._center_activations: np.ndarray | None = None

    def cached_outputs(self) -> tuple[str, ...]:
        return ("pooled", f"cut{self.base_cut}")

    def _train(self, run: TrainingRun) -> list[dict]:
        key, features = f"cut{self.base_cut}", self.model.features
        self._center_activations = _advance(features, run.center[key], self.base_cut, self.cut)
        act_views = {"center": self._center_activations}
        n = len(run.photos.files)
        for view, arrays in run.extra.items():  # place train-only views at their photo rows
            advanced = _advance(features, arrays[key], self.base_cut, self.cut)
            full = np.zeros((n,) + advanced.shape[1:], dtype=np.float16)
            full[run.train_rows] = advanced
            act_views[view] = full
        return finetune_cached(
            self.model,
            self.cut,
            CachedViews(act_views),
            run.train_rows,
            _train_views(self.config),
            run.photos.labels,
            run.valid_rows,
            self.config,
            progress=run.progress,
        )

    def final_features(self, run: TrainingRun, *, exact_outputs: bool) -> np.ndarray:
        if exact_outputs or self._center_activations is None:
            return super().final_features(run, exact_outputs=exact_outputs)
        suffix = TrainableSuffix(self.model.features, self.cut).eval()
        with torch.no_grad():
            return cached_logits(
                self.model,
                suffix,
                CachedViews({"center": self._center_activations}),
                np.arange(len(run.photos.files)),
                "center",
            )[0].numpy()


class EndToEndFinetune(TrainingMode):
    """Every layer trained on photos decoded and augmented afresh each epoch (``unfrozen_blocks="all"``)."""

    def _train(self, run: TrainingRun) -> list[dict]:
        return finetune_end_to_end(
            self.model, run.photos, run.train_rows, run.valid_rows, self.config, progress=run.progress
        )


def training_mode(config: TrainConfig, model: ListingModel) -> TrainingMode:
    """The strategy for ``config.mode`` (and, when fine-tuning, ``config.unfrozen_blocks``)."""
    if config.mode == "probe":
        return LinearProbe(config, model)
    if config.unfrozen_blocks == "all":
        return EndToEndFinetune(config, model)
    return CachedFinetune(config, model)


# --------------------------------------------------------------------------- the whole run


def fit(
    config: TrainConfig,
    photos: TrainingPhotos,
    *,
    cache_dir: Path | str | None = DEFAULT_CACHE_DIR,
    progress: bool = True,
    extractor: FeatureExtractor | None = None,
    exact_outputs: bool = True,
) -> TrainResult:
    """Train per `config` on `photos`; return the model and its outputs on every photo.

    With `exact_outputs` a fine-tuned model's outputs come from a fresh pass of the final model over
    every photo (what the embedder will compute); without, from the cached float16 activations
    (hyper-parameter search: nearly the same numbers, no backbone pass)."""
    seed_everything(config.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    backbone = get_backbone(config.backbone)
    model = ListingModel(backbone, len(photos.categories), pretrained=True, dropout=config.dropout)
    model.eval()
    extractor = extractor or FeatureExtractor(
        backbone, cache_dir=cache_dir, progress=progress, features=model.features
    )
    extractor._features = model.features  # one set of weights in memory
    mode = training_mode(config, model)
    files, keys, labels = photos.files, photos.keys, photos.labels
    fit_splits = ("train", "valid") if config.fit_on == "train+valid" else ("train",)
    train_rows = np.flatnonzero(photos.mask(*fit_splits))
    valid_rows = np.flatnonzero(photos.mask("valid")) if config.fit_on == "train" else np.array([], int)
    train_files = [files[r] for r in train_rows]
    train_keys = [keys[r] for r in train_rows]

    # 1. backbone passes (cached): every photo's centre view; train photos' extra views.
    t0 = time.perf_counter()
    outputs = mode.cached_outputs()
    run = TrainingRun(
        config,
        model,
        photos,
        config.backbone,
        train_rows,
        valid_rows,
        center=extractor.get(files, keys, "center", outputs),
        progress=progress,
    )
    for view in mode.extra_views():
        run.extra[view] = extractor.get(train_files, train_keys, view, outputs)
    timings["features_s"] = time.perf_counter() - t0

    # 2. the linear head on frozen pooled features (probe mode; LP-FT's first step).
    t0 = time.perf_counter()
    head_history: list[dict] = []
    if mode.fits_probe_head:
        x_train = [run.center["pooled"][train_rows]] + [
            run.extra[v]["pooled"] for v in run.extra if v == "flip"
        ]
        y_train = np.concatenate([labels[train_rows]] * len(x_train))
        with single_thread():
            head_history = train_head(
                model.head,
                np.concatenate(x_train),
                y_train,
                run.center["pooled"][valid_rows],
                labels[valid_rows],
                mode.probe_config(),
                progress=progress,
            )
    timings["head_s"] = time.perf_counter() - t0

    # 3. the mode's own training.
    t0 = time.perf_counter()
    history = mode.train(run, head_history)
    timings["train_s"] = time.perf_counter() - t0

    # 4. outputs on every photo with the final model.
    t0 = time.perf_counter()
    features = mode.final_features(run, exact_outputs=exact_outputs)
    timings["final_pass_s"] = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        tensor = torch.as_tensor(features, dtype=torch.float32)
        logits = model.head(tensor).numpy()
        embeddings = F.normalize(tensor, dim=1).numpy()  # what ListingModel.embed_and_classify gives
    timings["total_s"] = time.perf_counter() - started
    return TrainResult(model, config, history, features, embeddings, logits, timings)


def evaluate_result(result: TrainResult, photos: TrainingPhotos) -> dict:
    """Metrics on valid and test from the final model's outputs."""
    probs = softmax(result.logits)
    metrics: dict = {"definitions": DEFINITIONS}
    for split in ("valid", "test"):
        rows = photos.mask(split)
        if rows.any():
            metrics[split] = classification_metrics(
                probs[rows], photos.labels[rows], photos.listing_ids[rows], photos.categories
            )
    metrics["retrieval"] = retrieval_metrics(
        result.embeddings, photos.labels, photos.splits, photos.listing_ids
    )
    return metrics


def train_key(config: TrainConfig, photos: TrainingPhotos) -> str:
    payload = {"trainer": TRAINER_VERSION, "config": config.to_dict(), "data": photos.fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def up_to_date(out_dir: Path, key: str) -> dict | None:
    """The model card of `out_dir` when it was made from the same data and config, else None."""
    card_path = Path(out_dir) / CARD_FILE
    if not card_path.is_file() or not artifact_complete(out_dir):
        return None
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError:
        return None
    return card if card.get("train_key") == key else None


TEXT_REFIT_CHOICES = ("auto", "yes", "no")


def run(
    config: TrainConfig,
    data_dir: Path | str,
    out_dir: Path | str,
    *,
    cache_dir: Path | str | None = DEFAULT_CACHE_DIR,
    force: bool = False,
    progress: bool = True,
    photos: TrainingPhotos | None = None,
    text: str = "auto",
) -> dict:
    """Train, evaluate and export unless `out_dir` already holds this exact result; return the card.

    The text heads and text+image fusion weights (`training.text`) depend on the image model, so
    when a new image model is exported they are refit too: always with ``text="yes"``, with
    ``"auto"`` when `out_dir` already had text heads (which would otherwise be stale and refused
    at load), never with ``"no"``.
    """
    if text not in TEXT_REFIT_CHOICES:
        raise ValueError(f"text must be one of {TEXT_REFIT_CHOICES}, got {text!r}")

    started = time.perf_counter()
    photos = photos or load_training_photos(data_dir)
    key = train_key(config, photos)
    if not force and (card := up_to_date(Path(out_dir), key)):
        log.info("%s is up to date (same data fingerprint and config); nothing to train", out_dir)
        if not card.get("runtimes"):  # exported before the inference runtimes: add their files
            from common.model import load_artifact

            card = write_runtime_files(Path(out_dir), load_artifact(Path(out_dir)).model, photos)
        card["up_to_date"] = True
        return card
    result = fit(config, photos, cache_dir=cache_dir, progress=progress)
    metrics = evaluate_result(result, photos)
    result.timings["wall_s"] = time.perf_counter() - started
    had_text_heads = (Path(out_dir) / TEXT_CARD_FILE).is_file()
    card = export_artifact(Path(out_dir), result, photos, metrics, train_key=key)
    card["up_to_date"] = False
    if text == "yes" or (text == "auto" and had_text_heads):
        card["text_refit"] = refit_text_heads(Path(data_dir), Path(out_dir))
    elif had_text_heads:
        log.warning(
            "the text heads and fusion weights in %s were fit for the previous image model and "
            "will be refused at load; refit them with `python -m training.text --data %s "
            "--artifact %s`",
            out_dir,
            data_dir,
            out_dir,
        )
    elif (Path(out_dir) / FUSION_WEIGHTS_FILE).is_file():
        log.warning(
            "the fusion weights in %s were chosen for the previous image model and will be "
            "refused at load; choose them again with `python -m training.fusion_weights "
            "--data %s --artifact %s`",
            out_dir,
            data_dir,
            out_dir,
        )
    return card


def refit_text_heads(data_dir: Path, artifact_dir: Path) -> dict:
    """Refit the text heads, the text+image fusion and the gateway's fusion weights on the
    artefact's new image model (`training.text.run`); returns its test top-1 figures."""
    from training import text as text_training

    log.info("refitting the text heads and fusion weights for the new image model in %s", artifact_dir)
    metrics = text_training.run(data_dir, artifact_dir, artifact_dir)
    return {name: row.get("test") for name, row in metrics.get("top1", {}).items()}


def format_summary(card: dict) -> str:
    m = card.get("metrics", {})
    parts = [f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float)]
    return f"{card.get('model_version')}: " + " ".join(parts)


# --------------------------------------------------------------------------- CLI


def build_config(args: argparse.Namespace) -> TrainConfig:
    if args.config:
        config = load_config(args.config)
    else:
        name = args.preset or ("probe" if (args.mode or "probe") == "probe" else None)
        config = preset(name) if name else TrainConfig(mode=args.mode)
    changes = {}
    if args.mode:
        changes["mode"] = args.mode
    if args.backbone:
        changes["backbone"] = args.backbone
    for text in args.set or []:
        key, value = parse_override(text)
        changes[key] = value
    if args.name:
        changes["name"] = args.name
    elif args.out and not args.config and not args.preset:
        changes["name"] = Path(args.out).name
    return TrainConfig.from_dict(config.to_dict() | changes) if changes else config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_OUT_DIR, help="prepared data folder")
    parser.add_argument(
        "--out", type=Path, default=None, help="artefact directory (default artifacts/<name>)"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration")
    parser.add_argument("--config", type=Path, help="a JSON file of TrainConfig keys (may name a preset)")
    parser.add_argument("--mode", choices=("probe", "finetune"), help="override the mode")
    parser.add_argument("--backbone", help="override the backbone (efficientnet_lite0/1/2, resnet34)")
    parser.add_argument("--name", help="override the config name")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR, help="feature cache directory")
    parser.add_argument("--force", action="store_true", help="retrain even when the artefact is up to date")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--text",
        choices=TEXT_REFIT_CHOICES,
        default="auto",
        help="refit the text heads and fusion weights (training.text) on the new image "
        "model: auto = when the artefact directory already has them",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    set_threads()
    try:
        config = build_config(args)
    except (ValueError, KeyError) as exc:
        parser.error(str(exc))
    out = args.out or Path("artifacts") / config.name
    card = run(
        config,
        args.data,
        out,
        cache_dir=args.cache,
        force=args.force,
        progress=not args.no_progress,
        text=args.text,
    )
    print(format_summary(card))
    print(f"artefact: {out}  ({'up to date, nothing trained' if card.get('up_to_date') else 'written'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
