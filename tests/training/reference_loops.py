"""The three training loops of training/train.py as they were before they shared one epoch loop
(commit "training: one epoch loop"), kept verbatim as the reference the refactored code must match
bit for bit (tests/training/test_epoch_loop.py). Only the imports are new."""

# ruff: noqa: E501
from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common.backbones import get_backbone
from common.model import ListingModel
from training.config import TrainConfig
from training.dataset import TrainingPhotos
from training.features import TrainableSuffix
from training.train import CachedViews, _fmt, _freeze_bn, _optimiser, _progress, _schedule, cached_logits, log


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
    history, best = [], None
    bar = tqdm(
        range(config.epochs),
        desc="head",
        unit="epoch",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    for epoch in bar:
        head.train()
        order = torch.randperm(len(xt), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            logits = head(dropout(xt[rows]))
            loss = F.cross_entropy(logits, yt[rows], label_smoothing=config.label_smoothing)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(rows)
            correct += int((logits.argmax(1) == yt[rows]).sum())
        head.eval()
        entry = {"epoch": epoch + 1, "train_loss": total_loss / len(xt), "train_acc": correct / len(xt)}
        if len(xv):
            with torch.no_grad():
                logits = head(xv)
            entry["valid_loss"] = float(F.cross_entropy(logits, yv))
            entry["valid_acc"] = float((logits.argmax(1) == yv).float().mean())
            if best is None or (entry["valid_acc"], -entry["valid_loss"]) > best[0]:
                best = (
                    (entry["valid_acc"], -entry["valid_loss"]),
                    {k: v.detach().clone() for k, v in head.state_dict().items()},
                    epoch + 1,
                )
        history.append(entry)
        bar.set_postfix(valid_acc=f"{entry.get('valid_acc', float('nan')):.3f}")
    if best is not None:
        head.load_state_dict(best[1])
        history.append({"best_epoch": best[2]})
    return history


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
    history, best = [], None
    for epoch in range(config.epochs):
        suffix.train()
        if config.freeze_bn:
            _freeze_bn(suffix)
        model.dropout.train()
        order = generator.permutation(train_rows)
        chosen = generator.integers(len(train_views), size=len(order))
        total_loss, correct, seen = 0.0, 0, 0
        bar = _progress(len(order), f"epoch {epoch + 1}/{config.epochs}", progress)
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            x = views.batch(rows, [train_views[c] for c in chosen[start : start + config.batch_size]])
            logits = model.head(model.dropout(suffix(x)))
            loss = F.cross_entropy(logits, y[rows], label_smoothing=config.label_smoothing)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(rows)
            correct += int((logits.argmax(1) == y[rows]).sum())
            seen += len(rows)
            bar.update(len(rows))
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        bar.close()
        entry = {"epoch": epoch + 1, "train_loss": total_loss / seen, "train_acc": correct / seen}
        if len(valid_rows):
            logits = cached_logits(model, suffix, views, valid_rows, "center")[1]
            yv = y[valid_rows]
            entry["valid_loss"] = float(F.cross_entropy(logits, yv))
            entry["valid_acc"] = float((logits.argmax(1) == yv).float().mean())
            if best is None or (entry["valid_acc"], -entry["valid_loss"]) > best[0]:
                best = (
                    (entry["valid_acc"], -entry["valid_loss"]),
                    {k: v.detach().clone() for k, v in model.state_dict().items()},
                    epoch + 1,
                )
        history.append(entry)
        log.info(
            "epoch %d/%d  train loss %.3f acc %.3f  valid loss %s acc %s",
            epoch + 1,
            config.epochs,
            entry["train_loss"],
            entry["train_acc"],
            _fmt(entry.get("valid_loss")),
            _fmt(entry.get("valid_acc")),
        )
    for p in model.parameters():
        p.requires_grad_(True)
    if best is not None:
        model.load_state_dict(best[1])
        history.append({"best_epoch": best[2]})
    model.eval()
    return history


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

    history, best = [], None
    for epoch in range(config.epochs):
        model.train()
        if config.freeze_bn:
            _freeze_bn(model)
        order = generator.permutation(train_rows)
        total_loss, correct, seen = 0.0, 0, 0
        bar = _progress(len(order), f"epoch {epoch + 1}/{config.epochs}", progress)
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            logits = model(load(rows, augment))
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
        model.eval()
        entry = {"epoch": epoch + 1, "train_loss": total_loss / seen, "train_acc": correct / seen}
        if len(valid_rows):
            with torch.no_grad():
                logits = torch.cat(
                    [model(load(valid_rows[i : i + 64], evaluate)) for i in range(0, len(valid_rows), 64)]
                )
            entry["valid_loss"] = float(F.cross_entropy(logits, labels[valid_rows]))
            entry["valid_acc"] = float((logits.argmax(1) == labels[valid_rows]).float().mean())
            if best is None or (entry["valid_acc"], -entry["valid_loss"]) > best[0]:
                best = (
                    (entry["valid_acc"], -entry["valid_loss"]),
                    {k: v.detach().clone() for k, v in model.state_dict().items()},
                    epoch + 1,
                )
        history.append(entry)
        log.info(
            "epoch %d/%d  train loss %.3f acc %.3f  valid acc %s",
            epoch + 1,
            config.epochs,
            entry["train_loss"],
            entry["train_acc"],
            _fmt(entry.get("valid_acc")),
        )
    if best is not None:
        model.load_state_dict(best[1])
        history.append({"best_epoch": best[2]})
    model.eval()
    return history
