"""A linear embedding projection learned from listings with two or more photos.

Category training makes features good at telling categories apart, not at finding *the same item*
again. Two photos of one listing show the same object, so they are free positive pairs: a linear map
``W (x - mean)`` is trained with a symmetric InfoNCE loss (each photo must pick its partner out of
the batch) on the train split only; test listings are never seen. The map becomes
``ListingModel.projection`` and its normalised output is the served embedding.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def listing_pairs(listing_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """All (i, j) index pairs (i != j) of photos among `rows` that belong to the same listing."""
    groups: dict[str, list[int]] = {}
    for row in rows:
        groups.setdefault(listing_ids[row], []).append(int(row))
    pairs = [(a, b) for members in groups.values() if len(members) > 1
             for a in members for b in members if a != b]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def train_projection(features: np.ndarray, pairs: np.ndarray, *, dim: int, epochs: int,
                     temperature: float, seed: int, lr: float = 1e-3, weight_decay: float = 1e-4,
                     batch_size: int = 256, views: list[np.ndarray] | None = None,
                     progress=None) -> nn.Linear:
    """Fit ``nn.Linear(D, dim)`` (its bias holds ``-W mean``) on photo pairs.

    `features` (N, D) are the pooled features; `views` optional extra (N, D) arrays of other views
    of the same photos (e.g. mirrored), drawn at random per pair as augmentation.
    """
    generator = torch.Generator().manual_seed(seed)
    base = torch.as_tensor(features, dtype=torch.float32)
    all_views = [base] + [torch.as_tensor(v, dtype=torch.float32) for v in (views or [])]
    mean = base.mean(0)
    scale = (base - mean).norm(dim=1).mean()
    layer = nn.Linear(base.shape[1], dim)
    with torch.no_grad():  # start from a random orthogonal map of the centred features
        q, _ = torch.linalg.qr(torch.randn(base.shape[1], dim, generator=generator))
        layer.weight.copy_(q.T / scale)
        layer.bias.copy_(-layer.weight @ mean)
    optimiser = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    pairs_t = torch.as_tensor(pairs)
    steps = epochs * max(1, (len(pairs_t) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for epoch in range(epochs):
        order = torch.randperm(len(pairs_t), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = pairs_t[order[start:start + batch_size]]
            choice = torch.randint(len(all_views), (2,), generator=generator)
            a = F.normalize(layer(all_views[int(choice[0])][batch[:, 0]]), dim=1)
            b = F.normalize(layer(all_views[int(choice[1])][batch[:, 1]]), dim=1)
            logits = a @ b.T / temperature
            target = torch.arange(len(batch))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
        if progress is not None:
            progress(epoch, float(loss))
    return layer
