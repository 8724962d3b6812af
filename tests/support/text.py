"""One all-MiniLM-L6-v2 `TextEncoder` per test process, and an in-process embedder serving it.

Loading the text model takes many seconds on a busy CPU (importing sentence-transformers is most
of it), so the embedder and gateway text tests share one instance instead of each loading it.
Tests skip when the offline package is not installed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from common.text import TextEncoder, TextModelUnavailable


@functools.lru_cache(maxsize=1)
def _load() -> TextEncoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return TextEncoder()


def shared_text_encoder() -> TextEncoder:
    """The process-wide text encoder (loaded on first use); skips the test if unavailable."""
    try:
        return _load()
    except TextModelUnavailable as exc:
        pytest.skip(f"text model unavailable: {exc}")


def start_text_embedder(config):
    """Start an embedder server for ``config`` (its artefact, limits, port) that serves text
    with the shared encoder, whatever ``config.text_model`` says."""
    from services.embedder.core import Embedder, load_fusion_weights
    from services.embedder.engine import ImageModel
    from services.embedder.server import start

    model = ImageModel.load(
        Path(config.artifact_dir), max_image_bytes=config.max_image_bytes, max_pixels=config.max_pixels
    )
    fusion, problem = load_fusion_weights(config.artifact_dir, model.version)
    core = Embedder(
        model,
        max_batch=config.max_batch,
        batch_size=config.batch_size,
        max_wait_ms=config.max_wait_ms,
        decode_threads=config.resolved_decode_threads,
        torch_threads=config.resolved_torch_threads,
        text_encoder=shared_text_encoder(),
        max_text_chars=config.max_text_chars,
        fusion_weights=fusion,
        fusion_weights_problem=problem,
    )
    return start(config, core=core)
