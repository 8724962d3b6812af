"""Backbone features computed once and cached on disk, and the frozen/trainable split of a backbone.

Why: on a 2-core CPU one pass of EfficientNet-Lite0 over the 3,453 catalogue photos takes minutes.
Probe training needs only the pooled features; partial fine-tuning of the last blocks needs only the
activations *before* those blocks. Both are computed once per photo and view and kept in a cache keyed
by the photo's bytes (sha256), so re-running with unchanged photos recomputes nothing and a changed
photo is recomputed alone.

Views of a photo:

* ``center`` -- the evaluation transform (`Preprocessing.transform`), exactly what the embedder uses;
* ``flip``   -- the same, mirrored left-right (test-time augmentation, cheap training augmentation);
* ``aug<k>`` -- the training transform (`Preprocessing.train_transform`: random resized crop, flip,
  blur) drawn with a seed fixed by the photo and k, so view k of a photo is the same in every run.

Outputs of the backbone:

* ``pooled``  -- the pooled feature vector (float32, `Backbone.embedding_dim`), the embedding;
* ``cut<n>``  -- the activation after the stem and the first n backbone blocks (float16 to halve the
  disk and memory), the input of `TrainableSuffix` when the last blocks are fine-tuned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from common.backbones import Backbone
from common.files import sha256_file
from training.settings import TRAINING_PRECISION, TRAINING_RUNTIME
from common.model import FOLD_TOLERANCE, export_onnx, fold_batch_norms_measured
from common.runtimes import Choice, RuntimeUnavailable, Session, TorchSession, choose_session, open_session

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / "build" / "cache" / "features"
#: Photos of the first batch a runtime is compared with torch on before it computes features.
CHECK_PHOTOS = 16


# --------------------------------------------------------------------------- backbone split


def _kind(features: nn.Module) -> str:
    if hasattr(features, "conv_stem") and hasattr(features, "blocks"):
        return "efficientnet"
    if hasattr(features, "layer1") and hasattr(features, "conv1"):
        return "resnet"
    raise TypeError(f"cannot split backbone module {type(features).__name__}")


def backbone_blocks(features: nn.Module) -> list[nn.Module]:
    """The backbone's residual blocks in order (EfficientNet: every inverted-residual block of
    every stage, 16 for Lite0; ResNet34: every BasicBlock, 16)."""
    if _kind(features) == "efficientnet":
        return [block for stage in features.blocks for block in stage]
    return [
        block
        for layer in (features.layer1, features.layer2, features.layer3, features.layer4)
        for block in layer
    ]


def _stem(features: nn.Module) -> list[nn.Module]:
    if _kind(features) == "efficientnet":
        return [features.conv_stem, features.bn1]
    return [features.conv1, features.bn1, features.relu, features.maxpool]


def _tail(features: nn.Module) -> list[nn.Module]:
    """What follows the last block up to the pooled vector (the classifier is Identity)."""
    if _kind(features) == "efficientnet":
        return [features.conv_head, features.bn2, features.global_pool]
    return [features.avgpool, nn.Flatten(1)]


class FrozenPrefix(nn.Module):
    """Stem + the first `cut` blocks; shares its parameters with the backbone it was made from."""

    def __init__(self, features: nn.Module, cut: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*_stem(features), *backbone_blocks(features)[:cut])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class TrainableSuffix(nn.Module):
    """Blocks ``cut..`` + head conv + pooling; shares its parameters with the backbone, so training it
    trains the backbone in place. ``TrainableSuffix(f, c)(FrozenPrefix(f, c)(x)) == f(x)``."""

    def __init__(self, features: nn.Module, cut: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*backbone_blocks(features)[cut:], *_tail(features))

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.layers(activations).flatten(1)


def cut_for(features: nn.Module, unfrozen_blocks: int) -> int:
    """The number of frozen blocks when the last `unfrozen_blocks` are trained."""
    total = len(backbone_blocks(features))
    if not 0 <= unfrozen_blocks <= total:
        raise ValueError(f"unfrozen_blocks must be in 0..{total}, got {unfrozen_blocks}")
    return total - unfrozen_blocks


# --------------------------------------------------------------------------- views


def _view_seed(key: str, k: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}:{k}".encode()).digest()[:8], "little") & (2**63 - 1)


class ViewTransform:
    """PIL image (+ its cache key) -> input tensor for one named view."""

    def __init__(self, backbone: Backbone, view: str) -> None:
        self.view = view
        pre = backbone.preprocessing
        if view in ("center", "flip"):
            self.transform = pre.transform()
            self.aug_index = None
        elif view.startswith("aug") and view[3:].isdigit():
            self.transform = pre.train_transform()
            self.aug_index = int(view[3:])
        else:
            raise ValueError(f"unknown view {view!r}: use center, flip or aug<k>")

    def describe(self) -> str:
        """The view and its transform steps, without object addresses (stable across runs)."""
        return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{self.view}:{self.transform!r}")

    def __call__(self, image: Image.Image, key: str) -> torch.Tensor:
        if self.aug_index is None:
            tensor = self.transform(image)
            return tensor.flip(-1) if self.view == "flip" else tensor
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_view_seed(key, self.aug_index))
            return self.transform(image)


# --------------------------------------------------------------------------- the cache


class FeatureStore:
    """One (backbone, view, output) slice of the cache: sha256 of a photo -> array.

    Stored as append-only shards (``<dir>/shard-*.npz`` with ``keys`` and ``values``) so an
    interrupted or incremental run keeps what it computed; a ``meta.json`` says what it holds.
    """

    def __init__(
        self,
        root: Path,
        backbone: Backbone,
        view: ViewTransform,
        output: str,
        *,
        precision: str | None = None,
    ) -> None:
        self.meta = {
            "cache_version": CACHE_VERSION,
            "backbone": backbone.name,
            "preprocessing": backbone.preprocessing.to_dict(),
            "view": view.describe(),
            "output": output,
        }
        if precision:
            self.meta["precision"] = precision
        tag = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / backbone.name / f"{output}-{view.view}-{tag}"
        self._data: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._data is None:
            self._data = {}
            for shard in sorted(self.dir.glob("shard-*.npz")):
                try:
                    with np.load(shard, allow_pickle=False) as npz:
                        self._data.update(zip(npz["keys"].tolist(), npz["values"]))
                except (OSError, ValueError, KeyError) as exc:  # a torn shard: recompute its rows
                    log.warning("ignoring unreadable cache shard %s: %s", shard, exc)
        return self._data

    def missing(self, keys: Sequence[str]) -> list[str]:
        data = self._load()
        return [k for k in dict.fromkeys(keys) if k not in data]

    def add(self, keys: Sequence[str], values: np.ndarray) -> None:
        if not len(keys):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            meta_path.write_text(json.dumps(self.meta, indent=2))
        name = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        tmp = self.dir / f"{name}.tmp.npz"
        np.savez(tmp, keys=np.asarray(list(keys)), values=values)
        tmp.replace(self.dir / f"{name}.npz")
        self._load().update(zip(keys, values))

    def get(self, keys: Sequence[str]) -> np.ndarray:
        data = self._load()
        return np.stack([data[k] for k in keys])


class FeatureExtractor:
    """Computes and caches backbone outputs of photos for named views.

    ``get(paths, keys, view, outputs)`` returns ``{output: array (N, ...)}`` in the order of
    `paths`; only photos missing from the cache are run through the backbone, in one pass that
    fills every requested output at once.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        cache_dir: Path | str | None = DEFAULT_CACHE_DIR,
        batch_size: int = 32,
        progress: bool = True,
        features: nn.Module | None = None,
        runtime: str | None = None,
        precision: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.progress = progress
        self._features = features
        self._memory: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        #: where the pooled features are computed (`common.runtimes`): TRAINING_RUNTIME (auto:
        #: the fastest runtime that matches torch on the first photos) and TRAINING_PRECISION
        self.runtime = runtime or TRAINING_RUNTIME.from_environment()
        self.precision = precision or TRAINING_PRECISION.from_environment()
        #: the runtime session for each tuple of outputs, for the backbone module it was made from
        self._sessions: dict[tuple[str, ...], Session | None] = {}
        self._session_features: nn.Module | None = None
        self._export_dir: tempfile.TemporaryDirectory | None = None
        self.choice: Choice | None = None

    @property
    def features(self) -> nn.Module:
        if self._features is None:
            self._features = _folded(self.backbone.build(True).eval(), self.backbone.preprocessing.input_size)
        return self._features

    def _store(self, view: ViewTransform, output: str) -> FeatureStore | None:
        if self.cache_dir is None:
            return None
        # fp32 runtimes give torch's features to float32 rounding and share its cache; a lossy
        # precision gets a cache of its own
        precision = self.precision if output == "pooled" and self.precision != "fp32" else None
        return FeatureStore(self.cache_dir, self.backbone, view, output, precision=precision)

    def pooled_session(self, check_batch: torch.Tensor) -> Session | None:
        """The session computing pooled features (see `session_for`)."""
        return self.session_for(("pooled",), check_batch)

    def session_for(self, outputs: Sequence[str], check_batch: torch.Tensor) -> Session | None:
        """The session computing `outputs` (``pooled`` and/or ``cut<n>`` activations), chosen once
        per backbone module and outputs on the first batch of real photos
        (`common.runtimes.choose_session`); None means torch, block by block.

        Cut activations are cached as float16 and shared with torch's cache, so they come from a
        runtime only at fp32: the session's outputs are each cut flattened (the check's cosine is
        the whole activation's, per photo) and then the pooled features."""
        outputs = tuple(outputs)
        features = self.features
        if self._session_features is not features:
            self._sessions, self._session_features = {}, features
        if outputs in self._sessions:
            return self._sessions[outputs]
        if outputs != ("pooled",) and self.precision != "fp32":
            self._sessions[outputs] = None
            return None
        module = features if outputs == ("pooled",) else _CutOutputs(features, outputs).eval()
        reference = TorchSession(module, channels_last=True)
        inputs = check_batch[:CHECK_PHOTOS].numpy()

        def open_candidate(runtime: str, precision: str) -> Session:
            if runtime == "torch":
                return TorchSession(module, precision=precision, channels_last=True)
            if precision == "int8":
                raise RuntimeUnavailable(
                    "int8 is not used for the training features (it would "
                    "train the head on quantised features)"
                )
            return open_session(
                runtime,
                self._onnx_file(module, _session_outputs(outputs)),
                precision=precision,
                threads=torch.get_num_threads(),
                workers=1,
            )

        choice = choose_session(
            self.runtime,
            self.precision,
            reference=reference,
            inputs=inputs,
            open_candidate=open_candidate,
            names=("TRAINING_RUNTIME", "TRAINING_PRECISION"),
        )
        for reason in choice.passed_over:
            log.info("feature runtime passed over: %s", reason)
        if choice.speeds:
            log.info(
                "feature runtime speed trial (ms per photo): %s",
                ", ".join(f"{name} {seconds * 1e3:.1f}" for name, seconds in choice.speeds.items()),
            )
        log.info(
            "backbone %s computed by %s %s%s",
            "+".join(outputs),
            choice.session.runtime,
            choice.session.precision,
            f" ({choice.check.describe()})" if choice.check else "",
        )
        self.choice = choice
        session = None if choice.session is reference else choice.session
        self._sessions[outputs] = session
        return session

    def _onnx_file(self, module: nn.Module, outputs: Sequence[str] = ("pooled",)) -> Path:
        if self._export_dir is None:
            self._export_dir = tempfile.TemporaryDirectory(prefix="features-onnx-")
        path = Path(self._export_dir.name) / f"features-{'-'.join(outputs)}.onnx"
        export_onnx(module, self.backbone.preprocessing.input_size, path, tuple(outputs))
        return path

    def get(
        self,
        paths: Sequence[Path | str],
        keys: Sequence[str],
        view: str = "center",
        outputs: Sequence[str] = ("pooled",),
        desc: str | None = None,
    ) -> dict[str, np.ndarray]:
        if len(paths) != len(keys):
            raise ValueError("paths and keys differ in length")
        transform = ViewTransform(self.backbone, view)
        stores = {out: self._store(transform, out) for out in outputs}
        if self.cache_dir is None:
            memory = {out: self._memory.setdefault((view, out), {}) for out in outputs}
            todo = [k for k in dict.fromkeys(keys) if any(k not in memory[o] for o in outputs)]
        else:
            todo_set: dict[str, None] = {}
            for store in stores.values():
                todo_set.update(dict.fromkeys(store.missing(keys)))
            todo = list(todo_set)
        if todo:
            path_of = dict(zip(keys, paths))
            flush = 512 if self.cache_dir is not None else len(todo)

            def save(done_keys: list[str], values: dict[str, np.ndarray]) -> None:
                for out in outputs:
                    if self.cache_dir is None:
                        memory[out].update(zip(done_keys, values[out]))
                    else:
                        stores[out].add(done_keys, values[out])

            self._compute(
                [path_of[k] for k in todo],
                todo,
                transform,
                outputs,
                desc or f"{self.backbone.name} {view}",
                save,
                flush,
            )
        if self.cache_dir is None:
            return {out: np.stack([memory[out][k] for k in keys]) for out in outputs}
        return {out: stores[out].get(keys) for out in outputs}

    @torch.inference_mode()
    def _compute(
        self,
        paths: list,
        keys: list[str],
        transform: ViewTransform,
        outputs: Sequence[str],
        desc: str,
        save,
        flush: int,
    ) -> None:
        """Run the backbone over `paths`, handing every `flush` photos to ``save(keys, values)`` so an
        interrupted run keeps what it finished."""
        bad = [o for o in outputs if o != "pooled" and not (o.startswith("cut") and o[3:].isdigit())]
        if bad:
            raise ValueError(f"unknown outputs {bad}: use pooled or cut<n>")
        # The torch path runs the very module a runtime session is exported from.
        module = _CutOutputs(self.features.eval(), outputs).eval()
        names = _session_outputs(outputs)
        pending: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        pending_keys: list[str] = []
        bar = tqdm(
            total=len(paths),
            desc=desc,
            unit="img",
            file=sys.stderr,
            disable=not self.progress,
            dynamic_ncols=True,
            mininterval=2.0,
        )
        cut_shapes: dict[str, tuple[int, ...]] = {}

        def load(start: int) -> torch.Tensor:
            return torch.stack(
                [
                    transform(_open_rgb(p), k)
                    for p, k in zip(
                        paths[start : start + self.batch_size], keys[start : start + self.batch_size]
                    )
                ]
            ).contiguous(memory_format=torch.channels_last)

        # Photos are decoded and transformed one batch ahead, in one thread (it keeps the views'
        # seeded augmentations in order), while the backbone runs on the batch before.
        decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        try:
            upcoming = decoder.submit(load, 0) if paths else None
            for start in range(0, len(paths), self.batch_size):
                batch_keys = keys[start : start + self.batch_size]
                batch = upcoming.result()
                following = start + self.batch_size
                upcoming = decoder.submit(load, following) if following < len(paths) else None
                session = self.session_for(outputs, batch)
                if session is not None:  # the backbone in the faster runtime
                    results = session.run(batch.contiguous().numpy())
                else:
                    with torch.inference_mode():
                        results = [r.float().numpy() for r in module(batch)]
                for name, value in zip(names, results):
                    if name.startswith("cut"):
                        if name not in cut_shapes:
                            cut_shapes[name] = self._cut_shape(name, batch)
                        value = value.reshape((len(value),) + cut_shapes[name]).astype(np.float16)
                    pending[name].append(value)
                pending_keys += batch_keys
                bar.update(len(batch_keys))
                if len(pending_keys) >= flush or start + self.batch_size >= len(paths):
                    save(pending_keys, {o: np.concatenate(v) for o, v in pending.items()})
                    pending = {o: [] for o in outputs}
                    pending_keys = []
        finally:
            decoder.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _cut_shape(self, name: str, batch: torch.Tensor) -> tuple[int, ...]:
        """(C, H, W) of the activations after block ``cut<n>`` for this input size."""
        with torch.inference_mode():
            x = FrozenPrefix(self.features, int(name[3:]))(batch[:1])
        return tuple(x.shape[1:])


def _session_outputs(outputs: Sequence[str]) -> list[str]:
    """The order of a `_CutOutputs` session's outputs: the cuts (ascending), then pooled."""
    cuts = sorted((o for o in outputs if o.startswith("cut")), key=lambda o: int(o[3:]))
    return cuts + (["pooled"] if "pooled" in outputs else [])


class _CutOutputs(nn.Module):
    """images -> (each requested cut activation flattened, ..., pooled features), for export to an
    inference runtime; shares its parameters with `features`."""

    def __init__(self, features: nn.Module, outputs: Sequence[str]) -> None:
        super().__init__()
        self.names = _session_outputs(outputs)
        self.cuts = [int(o[3:]) for o in self.names if o.startswith("cut")]
        self.pooled = "pooled" in self.names
        self.stem = nn.Sequential(*_stem(features))
        self.blocks = nn.ModuleList(backbone_blocks(features))
        self.tail = nn.Sequential(*_tail(features))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(images)
        results = []
        last = len(self.blocks) if self.pooled else max(self.cuts)
        for i in range(last + 1):
            if i in self.cuts:
                results.append(x.flatten(1))
            if i < last:
                x = self.blocks[i](x)
        if self.pooled:
            results.append(self.tail(x).flatten(1))
        return tuple(results)


def _folded(features: nn.Module, input_size: int) -> nn.Module:
    """The frozen pretrained backbone with its batch norms folded into the convolutions (the
    embedder serves it the same way): the same features to float32 rounding, a faster backbone
    pass on a CPU. Refuses a backbone whose outputs the folding would change."""
    _, worst = fold_batch_norms_measured(features, features, input_size)
    if worst > FOLD_TOLERANCE:
        raise RuntimeError(
            f"folding the batch norms of {type(features).__name__} changed its features by {worst:.3g}"
        )
    return features.to(memory_format=torch.channels_last)


def _open_rgb(path: Path | str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def image_keys(paths: Sequence[Path | str]) -> list[str]:
    """Cache keys of photos: the sha256 of their bytes."""
    return [sha256_file(p) for p in paths]
