"""The image model as the embedder runs it: artefact, preprocessing, one forward pass.

Loading goes through ``common.model.load_artifact`` (safetensors + JSON, never pickle) and the
preprocessing is the backbone registry's own ``Preprocessing.transform()``, the same code
training evaluates with. Decoding untrusted bytes goes through ``common.images.open_image``.
Nothing here knows about gRPC or batching.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.images import ImageError, open_image
from common.model import (FOLD_TOLERANCE, Artifact, ArtifactError, fold_batch_norms_measured,
                          load_artifact)

log = logging.getLogger(__name__)

#: Resizing the shorter side to the input size makes a 1 x 40M-pixel strip 40 Gpx big; no
#: listing photo is this elongated, so such an image is refused before it is resized.
MAX_ASPECT_RATIO = 50


@dataclass(frozen=True)
class Bf16Support:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), and why we think so."""

    native: bool
    reason: str


def detect_bf16() -> Bf16Support:
    """Native bf16 needs AVX512-BF16 or AMX-BF16 instructions; without them PyTorch emulates
    bf16 matmuls and convolutions, which is slower than float32 and loses precision for nothing."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    native_flags = sorted(flags & {"avx512_bf16", "amx_bf16"})
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = False
    capability = torch.backends.cpu.get_cpu_capability()
    if native_flags:
        return Bf16Support(True, f"CPU flags {', '.join(native_flags)}; ATen {capability}")
    return Bf16Support(False, f"no avx512_bf16/amx_bf16 CPU flag (ATen {capability}, oneDNN bf16 "
                              f"{'available' if onednn_bf16 else 'unavailable'}); bf16 would be "
                              "emulated")


def configure_torch(threads: int) -> None:
    """Intra-op threads for the model; process-wide, so the service sets it once at start-up."""
    torch.set_num_threads(max(1, threads))


class ImageModel:
    """A loaded listing model: decode + preprocess one image, embed + classify a batch.

    ``preprocess`` is safe to call from many threads at once; ``forward`` is meant to be called
    from one thread (the batcher's worker), which owns the model.
    """

    def __init__(self, artifact: Artifact, *, max_image_bytes: int | None = None,
                 max_pixels: int | None = None, bf16: bool = False,
                 channels_last: bool = True, fold_bn: bool = True) -> None:
        self.artifact = artifact
        self.max_image_bytes = max_image_bytes
        self.max_pixels = max_pixels
        self.bf16 = bf16
        self.channels_last = channels_last
        self._transform = artifact.preprocessing.transform()
        model = artifact.model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.folded_batch_norms = self._fold(model) if fold_bn else 0
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._model = model
        self.categories: list[str] = artifact.categories
        self.version: str = artifact.version
        self.backbone: str = str(artifact.card["backbone"])
        self.embedding_dim: int = int(artifact.card["embedding_dim"])
        self.input_size: int = int(artifact.card.get("input_size")
                                   or artifact.preprocessing.input_size)
        self._check_shapes()

    @classmethod
    def load(cls, directory: Path, **options) -> "ImageModel":
        """Load an artefact directory; ``ArtifactError`` says what is missing or inconsistent."""
        try:
            artifact = load_artifact(Path(directory))
        except ArtifactError:
            raise
        except Exception as exc:  # e.g. safetensors' own error for a weights file that isn't one
            raise ArtifactError(f"cannot load the artefact in {directory}: "
                                f"{type(exc).__name__}: {exc}") from None
        return cls(artifact, **options)

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Untrusted encoded bytes -> the model's input tensor (3, H, W); ``ImageError`` if the
        bytes are not a usable image."""
        image = open_image(data, max_bytes=self.max_image_bytes, max_pixels=self.max_pixels)
        width, height = image.size
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ImageError(f"image is {width}x{height}, more elongated than "
                             f"{MAX_ASPECT_RATIO}:1")
        return self._transform(image)

    def forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One backbone pass, two heads: (unit-norm embeddings (B, D), softmax probabilities
        (B, C)), both float32."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    embeddings, logits = self._model.embed_and_classify(batch)
            else:
                embeddings, logits = self._model.embed_and_classify(batch)
            # float32 and unit length whatever precision the pass ran in
            embeddings = F.normalize(embeddings.float(), dim=1)
            probabilities = torch.softmax(logits.float(), dim=1)
        return embeddings.numpy(), probabilities.numpy()

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run the model once per batch size so the first requests don't pay for kernel setup."""
        for size in sorted(set(batch_sizes)):
            self.forward(torch.zeros(size, 3, self.input_size, self.input_size))

    def _fold(self, model: nn.Module) -> int:
        """Fold the model's batch norms (in place) and prove on a random batch that the outputs
        did not change; ``ArtifactError`` if they did (a layout this folding does not know)."""
        side = int(self.artifact.card.get("input_size") or self.artifact.preprocessing.input_size)
        folded, worst = fold_batch_norms_measured(model, model.embed_and_classify, side)
        if worst > FOLD_TOLERANCE:
            raise ArtifactError(f"folding batch norms changed the model's outputs by {worst:.3g}; "
                                "start with EMBEDDER_FOLD_BN=off and report the backbone")
        return folded

    def _check_shapes(self) -> None:
        side = self.input_size
        embeddings, probabilities = self.forward(torch.zeros(1, 3, side, side))
        if embeddings.shape[1] != self.embedding_dim:
            raise ArtifactError(f"model produces {embeddings.shape[1]}-d embeddings, the model "
                                f"card says {self.embedding_dim}")
        if probabilities.shape[1] != len(self.categories):
            raise ArtifactError(f"model has {probabilities.shape[1]} outputs, the label list has "
                                f"{len(self.categories)} categories")
