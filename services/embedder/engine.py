"""The image model as the embedder runs it: artefact, preprocessing, one forward pass.

Loading goes through ``common.model.load_artifact`` (safetensors + JSON, never pickle) and the
preprocessing is the backbone registry's own ``Preprocessing.transform()``, the same code
training evaluates with. Decoding untrusted bytes goes through ``common.images.open_image``.
Nothing here knows about gRPC or batching.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.images import ImageError, open_image
from common.model import (
    FOLD_TOLERANCE,
    ONNX_FILE,
    Artifact,
    ArtifactError,
    EmbedAndClassify,
    check_photo_files,
    export_onnx,
    fold_batch_norms_measured,
    load_artifact,
    runtime_model_file,
)
from common.runtimes import (
    Choice,
    RuntimeUnavailable,
    Session,
    TorchSession,
    choose_session,
    open_session,
    runtime_versions,
)

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
    return Bf16Support(
        False,
        f"no avx512_bf16/amx_bf16 CPU flag (ATen {capability}, oneDNN bf16 "
        f"{'available' if onednn_bf16 else 'unavailable'}); bf16 would be "
        "emulated",
    )


def configure_torch(threads: int) -> None:
    """Intra-op threads for the model; process-wide, so the service sets it once at start-up."""
    torch.set_num_threads(max(1, threads))


class ImageModel:
    """A loaded listing model: decode + preprocess one image, embed + classify a batch.

    The batch runs in one inference runtime (`common.runtimes`): ``runtime`` is ``torch`` (the
    reference), ``onnxruntime``, ``openvino`` or ``auto`` (the fastest that passes the check) and
    ``precision`` fp32, bf16 or int8. Every choice other than torch fp32 is compared with torch on
    the artefact's check photos at load and refused (``ArtifactError`` naming the setting) if it
    falls short; ``choice`` records the checks and what was passed over and why.
    ``threads`` is each model worker's thread count and ``workers`` how many call ``forward`` at
    once. ``preprocess`` and ``forward`` are safe to call from many threads at once.
    """

    def __init__(
        self,
        artifact: Artifact,
        *,
        max_image_bytes: int | None = None,
        max_pixels: int | None = None,
        runtime: str = "torch",
        precision: str = "fp32",
        threads: int = 1,
        workers: int = 1,
        channels_last: bool = True,
        fold_bn: bool = True,
        artifact_dir: Path | None = None,
        check_photos: list[Path] | None = None,
        setting_names: tuple[str, str] = ("EMBEDDER_RUNTIME", "EMBEDDER_PRECISION"),
    ) -> None:
        self.artifact = artifact
        self.max_image_bytes = max_image_bytes
        self.max_pixels = max_pixels
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
        self.input_size: int = int(artifact.card.get("input_size") or artifact.preprocessing.input_size)
        self._artifact_dir = Path(artifact_dir) if artifact_dir is not None else None
        self._threads, self._workers = max(1, threads), max(1, workers)
        self._export_dir: tempfile.TemporaryDirectory | None = None
        self.reference = TorchSession(model.embed_and_classify, channels_last=channels_last)
        self.session: Session = self.reference
        self._check_shapes()
        if check_photos is None and self._artifact_dir is not None:
            check_photos = check_photo_files(self._artifact_dir)
        self.choice = self._choose(runtime, precision, check_photos or [], setting_names)
        self.session = self.choice.session
        self.runtime: str = self.session.runtime
        self.precision: str = self.session.precision
        if self.session is not self.reference:
            self._check_shapes()

    @classmethod
    def load(cls, directory: Path, **options) -> "ImageModel":
        """Load an artefact directory; ``ArtifactError`` says what is missing or inconsistent."""
        try:
            artifact = load_artifact(Path(directory))
        except ArtifactError:
            raise
        except Exception as exc:  # e.g. safetensors' own error for a weights file that isn't one
            raise ArtifactError(
                f"cannot load the artefact in {directory}: {type(exc).__name__}: {exc}"
            ) from None
        options.setdefault("artifact_dir", Path(directory))
        return cls(artifact, **options)

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Untrusted encoded bytes -> the model's input tensor (3, H, W); ``ImageError`` if the
        bytes are not a usable image."""
        image = open_image(data, max_bytes=self.max_image_bytes, max_pixels=self.max_pixels)
        width, height = image.size
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ImageError(f"image is {width}x{height}, more elongated than {MAX_ASPECT_RATIO}:1")
        return self._transform(image)

    def forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One backbone pass, two heads: (unit-norm embeddings (B, D), softmax probabilities
        (B, C)), both float32, whatever runtime and precision computed them."""
        inputs = batch if self.session is self.reference else batch.numpy()
        embeddings, logits = self.session.run(inputs)[:2]
        embeddings = embeddings.astype(np.float32, copy=False)
        embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        logits = logits.astype(np.float32, copy=False)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return embeddings, shifted / shifted.sum(axis=1, keepdims=True)

    def describe_runtime(self) -> dict:
        """What serves the model and why, for the start-up log and benchmarks."""
        check = self.choice.check
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "check": check.describe() if check else "torch fp32 is the reference",
            "passed_over": self.choice.passed_over,
            "speed_trial_ms_per_photo": {
                name: round(seconds * 1e3, 2) for name, seconds in self.choice.speeds.items()
            },
            "versions": runtime_versions(),
        }

    def _choose(
        self, runtime: str, precision: str, check_photos: list[Path], names: tuple[str, str]
    ) -> Choice:
        """Resolve the runtime setting (see ``common.runtimes.choose_session``)."""
        inputs = np.zeros((0, 3, self.input_size, self.input_size), np.float32)
        if not (runtime == "torch" and precision == "fp32"):
            inputs = self._check_inputs(check_photos)

        def open_candidate(name: str, want: str) -> Session:
            if name == "torch":
                support = detect_bf16()
                if want == "bf16" and runtime == "auto" and not support.native:
                    raise RuntimeUnavailable(f"torch bf16 would be emulated: {support.reason}")
                return TorchSession(
                    self._model.embed_and_classify, precision=want, channels_last=self.channels_last
                )
            return open_session(
                name, self._onnx_file(want), precision=want, threads=self._threads, workers=self._workers
            )

        try:
            return choose_session(
                runtime,
                precision,
                reference=self.reference,
                inputs=inputs,
                open_candidate=open_candidate,
                names=names,
            )
        except RuntimeUnavailable as exc:
            raise ArtifactError(str(exc)) from None

    def _check_inputs(self, files: list[Path]) -> np.ndarray:
        rows = []
        for path in files:
            try:
                rows.append(self.preprocess(Path(path).read_bytes()))
            except (OSError, ImageError) as exc:
                log.warning("skipping check photo %s: %s", path, exc)
        if not rows:
            return np.zeros((0, 3, self.input_size, self.input_size), np.float32)
        return torch.stack(rows).numpy()

    def _onnx_file(self, precision: str) -> Path:
        """The artefact's ONNX model for ``precision``; for fp32/bf16 an artefact without one
        (exported before runtimes existed) gets one exported now into a temporary folder."""
        if self._artifact_dir is not None:
            path = runtime_model_file(self._artifact_dir, self.artifact.card, precision)
            if path is not None:
                return path
        if precision == "int8":
            raise RuntimeUnavailable(
                "the artefact has no int8 model (model.int8.onnx, quantised with training photos); "
                "add it with `python -m training.runtimes --artifact DIR --int8`"
            )
        if self._export_dir is None:
            self._export_dir = tempfile.TemporaryDirectory(prefix="embedder-onnx-")
            path = Path(self._export_dir.name) / ONNX_FILE
            started = time.perf_counter()
            export_onnx(EmbedAndClassify(self._model), self.input_size, path)
            log.info(
                "the artefact has no %s: exported one in %.1f s", ONNX_FILE, time.perf_counter() - started
            )
        return Path(self._export_dir.name) / ONNX_FILE

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
            raise ArtifactError(
                f"folding batch norms changed the model's outputs by {worst:.3g}; "
                "start with EMBEDDER_FOLD_BN=off and report the backbone"
            )
        return folded

    def _check_shapes(self) -> None:
        side = self.input_size
        embeddings, probabilities = self.forward(torch.zeros(1, 3, side, side))
        if embeddings.shape[1] != self.embedding_dim:
            raise ArtifactError(
                f"model produces {embeddings.shape[1]}-d embeddings, the model card says {self.embedding_dim}"
            )
        if probabilities.shape[1] != len(self.categories):
            raise ArtifactError(
                f"model has {probabilities.shape[1]} outputs, the label list has "
                f"{len(self.categories)} categories"
            )
