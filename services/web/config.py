"""HTTP edge settings, each declared once in `WEB_SETTINGS` (`common.config`): environment
variables, overridden by command-line flags. TLS to the gateway follows ``TLS_CA`` /
``TLS_CLIENT_*`` (`common.security`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import LOG_LEVEL, REPO_ROOT, Setting, merged
from common.security import TLS_CLIENT_SETTINGS, TlsFiles
from services.gateway.client import GATEWAY_ADDR

WEB_SETTINGS = merged(
    (
        Setting("WEB_HOST", "host", default="0.0.0.0", help="interface to listen on"),
        Setting(
            "WEB_PORT",
            "port",
            int,
            8000,
            minimum=0,
            maximum=65535,
            help="port of the page and the JSON API (0: any free port)",
        ),
        GATEWAY_ADDR,
        Setting(
            "IMAGE_STORE_DIR",
            "image_store_dir",
            Path,
            REPO_ROOT / "run" / "images",
            flag="--image-store",
            help="the listing photo store the gateway fills (`common.image_store`); the edge serves from it",
        ),
        Setting(
            "WEB_BOOTSTRAP_DIR",
            "bootstrap_dir",
            Path,
            deprecated_env=("WEB_SEED_DIR",),
            deprecated_flags=("--seed-dir",),
            help="prepared data whose photos are linked into the store at start when missing",
        ),
        Setting(
            "WEB_MAX_UPLOAD_MB",
            "max_upload_bytes",
            int,
            16,
            minimum=1,
            scale=1024 * 1024,
            flag="--max-upload-mb",
            help="largest request body, in MiB; a bigger upload is 413 before it is read",
        ),
        Setting(
            "WEB_GATEWAY_TIMEOUT_S",
            "gateway_timeout_s",
            float,
            30.0,
            minimum=0.1,
            help="deadline of each gateway call",
        ),
        LOG_LEVEL,
    ),
    TLS_CLIENT_SETTINGS,
)
_default = WEB_SETTINGS.default


@dataclass(frozen=True)
class WebConfig:
    """Everything the edge needs; ``from_env`` reads flags and env (`WEB_SETTINGS`), tests
    build it directly (`local` for an in-process server on a free loopback port)."""

    host: str = _default("host")
    port: int = _default("port")
    gateway_addr: str = _default("gateway_addr")
    image_store_dir: Path = _default("image_store_dir")
    bootstrap_dir: Path | None = _default("bootstrap_dir")
    max_upload_bytes: int = _default("max_upload_bytes")
    gateway_timeout_s: float = _default("gateway_timeout_s")
    log_level: str = _default("log_level")
    tls: TlsFiles = field(default_factory=TlsFiles.from_env)

    def __post_init__(self) -> None:
        WEB_SETTINGS.check(self)

    @classmethod
    def local(cls, **overrides: Any) -> "WebConfig":
        """An in-process server's config: loopback, a free port."""
        return cls(**{"host": "127.0.0.1", "port": 0, **overrides})

    @classmethod
    def from_env(cls, argv: list[str] | None = None) -> "WebConfig":
        values = WEB_SETTINGS.parse_args(
            "python -m services.web", "HTTP edge: the page and the JSON API", argv
        )
        tls = TlsFiles.from_values(values)
        return cls(**values, tls=tls)
